"""``d2moe serve`` (vLLM's OpenAI server) on a d2moe checkpoint, through the OpenAI client and
its ``/metrics``. The servers run in vLLM's default process layout (engine core and worker
spawned) with a memory budget, so the d2moe series on ``/metrics`` come from another process.

Two session-scoped servers: ``server`` serves the intact tiny Mixtral (its answers are compared
with the offline engine's); ``damaged_server`` serves the routed tiny Mixtral with a corrupt
4-bit plane in every layer-1 expert, where per-request targets (``vllm_xargs``) decide which
requests read the damage and fail (HTTP 500 naming the expert) and which are served."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
from vllm_d2moe.offload.pool import expert_nbytes
from vllm_d2moe.testing.damage import corrupt_section
from vllm_d2moe.testing.served import ServerError, running_server, serve_process

from conftest import PROMPTS, routed_budget


class Server:
    def __init__(self, client: openai.OpenAI, model: str, base_url: str, budget: int, log: Path):
        self.client, self.model, self.base_url, self.budget, self.log = client, model, base_url, budget, log


@contextlib.contextmanager
def _running_server(model: str, quantization_config: dict, tmp: Path):
    """``d2moe serve`` of ``model`` on a free port (float32, eager), once ``/health`` answers;
    a failed start fails the test with the log's tail."""
    args = ("--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.3", "--enforce-eager")
    try:
        with running_server(model, quantization_config, tmp / "server.log", args) as (_, base):
            yield base
    except ServerError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def server(model_zoo, tmp_path_factory):
    """The tiny Mixtral (no chat template given: its tokenizer ships one) with three of its 16
    experts at 8 bits in the budget: most layer calls read from disk."""
    model = str(model_zoo["mixtral"]["d2moe"])
    budget = 3 * expert_nbytes(MWQCheckpoint(model).layer(0).layout, 8) + 1024
    tmp = tmp_path_factory.mktemp("server")
    with _running_server(model, {"memory_budget": budget}, tmp) as base:
        yield Server(openai.OpenAI(base_url=f"{base}/v1", api_key="unused"), model, base, budget, tmp / "server.log")


# Residual plane 2 of every layer-1 expert is corrupt: 4-bit pairs need it, 2- and 3-bit ones do not.
DAMAGED_LAYER, DAMAGED_BITS = 1, 4


@pytest.fixture(scope="session")
def damaged_server(routed_mixtral, tmp_path_factory):
    """The routed tiny Mixtral (widths 2, 3, 4) with a corrupt 4-bit plane in every layer-1 expert,
    served at a budget of three experts (most layer calls read from disk), capacities off, failing
    (not degrading) on a damaged section: a request at target 2 bits never reads the damage
    (test_offload checks this offline), one at 4 bits does in its first step."""
    tmp = tmp_path_factory.mktemp("damaged-server")
    model = tmp / "model"
    shutil.copytree(routed_mixtral, model)
    spec = MWQCheckpoint(model).spec
    corrupt_section(model, DAMAGED_LAYER, DAMAGED_BITS - spec.min_bits)
    options = {"memory_budget": routed_budget(model), "capacities": "off", "on_read_error": "fail"}
    with _running_server(str(model), options, tmp) as base:
        yield Server(openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0), str(model), base,
                     options["memory_budget"], tmp / "server.log")


def test_completion_matches_offline_engine(server, engine_results):
    # Offline: all experts resident; served: streamed through the budget. Same tokens.
    reply = server.client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=16, temperature=0)
    offline = engine_results["mixtral/d2moe-8"]["outputs"][0]["text"]
    assert reply.choices[0].text == offline


def test_the_model_worker_is_bound_as_d2moe_serve_arranges(server):
    """vLLM logs the CPUs it binds the worker's threads to: on a small machine every CPU (no
    reservation for the engine core, ``cpu_setup.share_reserved_cpus``), elsewhere vLLM's own choice."""
    from vllm_d2moe import cpu_setup

    bound = re.findall(r"local_rank=0, core ids=\[([\d, ]*)\]", server.log.read_text())
    assert len(bound) == 1, server.log.read_text()[-3000:]
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) <= cpu_setup.SMALL_MACHINE_CPUS:
        assert [int(cpu) for cpu in bound[0].split(",")] == cpus


def test_chat_completion(server):
    """Out of the box: the server was given no template; the checkpoint's tokenizer ships one."""
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Write a parser."}]
    reply = server.client.chat.completions.create(model=server.model, messages=messages, max_tokens=12,
                                                  temperature=0)
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0
    tokenizer = AutoTokenizer.from_pretrained(server.model)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>user: Write a parser.\nassistant:"
    assert reply.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False).input_ids)


def test_invalid_width_option_stops_the_server(model_zoo, tmp_path):
    overrides = json.dumps({"quantization_config": {"quant_method": "d2moe", "bits": 9}})
    proc = serve_process([str(model_zoo["mixtral"]["d2moe"]), "--hf-overrides", overrides], tmp_path / "log")
    assert proc.wait(timeout=300) != 0
    assert "d2moe option 'bits' must be an integer in [1, 8], got 9" in (tmp_path / "log").read_text()


STARTER = """
import sys
from pathlib import Path
from vllm_d2moe.testing.served import serve_process
proc = serve_process([sys.argv[1]], Path(sys.argv[2]))
print(proc.pid, flush=True)
sys.stdin.read()  # until the test kills this process
"""


def _ended(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.extended  # a server start cut short: ~50 s
def test_a_server_ends_when_the_process_that_started_it_is_killed(model_zoo, tmp_path):
    """A test worker ended by SIGKILL (the OOM killer) leaves no server behind."""
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(model_zoo["mixtral"]["d2moe"]),
                                str(tmp_path / "log")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    server_pid = int(starter.stdout.readline())
    try:
        time.sleep(3)  # the server is importing vLLM: far from ready, alive
        assert not _ended(server_pid), (tmp_path / "log").read_text()
        starter.kill()
        starter.wait()
        deadline = time.monotonic() + 60
        while not _ended(server_pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _ended(server_pid), "the server outlived the process that started it"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server_pid, signal.SIGKILL)


def _samples(base_url: str) -> dict[tuple, float]:
    """``/metrics`` as {(sample name, sorted label items): value}."""
    text = urllib.request.urlopen(f"{base_url}/metrics", timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _sum(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, items), v in samples.items() if n == name and set(labels.items()) <= set(items))


def test_served_request_moves_the_d2moe_series_on_metrics(server):
    before = _samples(server.base_url)
    assert _sum(before, "d2moe_pool_bytes", kind="budget") == server.budget
    # A prompt no earlier test sent: no prefix-cache hit, every prompt token goes through the experts.
    reply = server.client.completions.create(
        model=server.model, prompt="metrics: count the pairs of", max_tokens=8, temperature=0
    )
    tokens = reply.usage.prompt_tokens + reply.usage.completion_tokens - 1  # the last one is not fed back
    expected_pairs = 2 * tokens  # top-2 experts per token, in each MoE layer
    deadline = time.monotonic() + 15  # the engine core publishes every second
    while True:
        after = _samples(server.base_url)
        moved = [_sum(after, "d2moe_width_pairs_total", layer=layer, bits="8")
                 - _sum(before, "d2moe_width_pairs_total", layer=layer, bits="8") for layer in ("0", "1")]
        if moved == [expected_pairs] * 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert moved == [expected_pairs] * 2, (moved, expected_pairs)
    assert after[("d2moe_average_bits", ())] == 8.0
    for layer in ("0", "1"):
        assert _sum(after, "d2moe_expert_reads_total", layer=layer) > _sum(before, "d2moe_expert_reads_total",
                                                                             layer=layer)
        assert _sum(after, "d2moe_bytes_read_total", layer=layer) > _sum(before, "d2moe_bytes_read_total",
                                                                           layer=layer)
        assert ("d2moe_expert_hits_total", (("layer", layer),)) in after
        assert ("d2moe_read_wait_seconds_total", (("layer", layer),)) in after
    assert 0 < _sum(after, "d2moe_pool_bytes", kind="occupied") <= _sum(after, "d2moe_pool_bytes", kind="allocated")
    # vLLM's own series still reach /metrics with the shared Prometheus directory.
    assert (_sum(after, "vllm:generation_tokens_total") - _sum(before, "vllm:generation_tokens_total")
            == reply.usage.completion_tokens)


def test_embedded_model_ships_the_chat_template():
    from transformers import AutoTokenizer

    import vllm_d2moe
    from vllm_d2moe.reference.tokenizer import CHAT_TEMPLATE

    assets = Path(vllm_d2moe.__file__).parent / "assets" / "reference-small"
    assert (assets / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    tokenizer = AutoTokenizer.from_pretrained(assets)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a parser."}]
    assert (tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == "<s>system: Be brief.\nuser: Write a parser.\nassistant:")


def test_server_patches_apply_where_the_openai_server_module_is_loaded():
    import importlib

    from vllm_d2moe.vllm_glue import patches

    importlib.import_module(patches.SERVER_MODULE)
    patches.apply()
    assert all(patches.is_applied(p) for p in patches.PATCHES + patches.SERVER_PATCHES)


# What the server answers for a request that needed a damaged expert: the store's message, the
# file by its name (vLLM would blank a path).
EXPERT_FAILURE = re.compile(
    rf"MoE layer {DAMAGED_LAYER} expert \d at {DAMAGED_BITS} bits could not be read: "
    rf"experts-layer-00{DAMAGED_LAYER}\.safetensors: checksum mismatch in layer {DAMAGED_LAYER} expert \d "
    rf"section {DAMAGED_BITS - 2}"
)


def _targeted(bits: float) -> dict:
    return {"extra_body": {"vllm_xargs": {"d2moe_target_bits": bits}}}


def _post(base_url: str, path: str, body: dict) -> tuple[int, str]:
    """``(HTTP status, body)`` of a POST (the body of a streamed answer: all its events)."""
    request = urllib.request.Request(f"{base_url}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_request_that_needs_an_unreadable_expert_fails_naming_it_and_the_server_lives(damaged_server):
    server = damaged_server
    prompt = {"model": server.model, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0,
              "vllm_xargs": {"d2moe_target_bits": DAMAGED_BITS}}
    status, body = _post(server.base_url, "/v1/completions", prompt)
    assert status == 500, body
    error = json.loads(body)["error"]
    assert EXPERT_FAILURE.search(error["message"]), error
    assert error["code"] == 500 and "Internal server error" not in error["message"] and "<path>" not in body
    # Streamed: the error event carries the same message.
    status, events = _post(server.base_url, "/v1/completions", {**prompt, "stream": True})
    assert status == 200 and EXPERT_FAILURE.search(events), events
    # Chat, through the OpenAI client.
    with pytest.raises(openai.InternalServerError) as failed:
        server.client.chat.completions.create(model=server.model, max_tokens=8, temperature=0,
                                              messages=[{"role": "user", "content": "Write a parser."}],
                                              **_targeted(DAMAGED_BITS))
    assert failed.value.status_code == 500 and EXPERT_FAILURE.search(str(failed.value)), failed.value
    assert urllib.request.urlopen(f"{server.base_url}/health", timeout=10).status == 200
    reply = server.client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                             **_targeted(2.0))
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 8


def _stable_samples(base_url: str) -> dict:
    """``/metrics`` once the engine core has published the width pairs of every earlier request
    (it publishes every second): two reads a publication apart agree on them."""

    def pairs(samples):
        return {key: value for key, value in samples.items() if key[0] == "d2moe_width_pairs_total"}

    samples = _samples(base_url)
    while True:
        time.sleep(1.2)
        again = _samples(base_url)
        if pairs(again) == pairs(samples):
            return again
        samples = again


def test_vllm_xargs_targets_reach_the_width_decision(damaged_server):
    """A request at 2 bits runs no layer-1 pair at 4 bits (the router's choices shift with the
    target); requests at 2 and 4 bits sent together are each served at their own target: the
    2-bit ones complete, the 4-bit ones read the damaged plane and fail."""
    server = damaged_server
    prompt = "xargs: pick the widths of"

    def complete(bits):
        try:
            return server.client.completions.create(model=server.model, prompt=prompt, max_tokens=8,
                                                    temperature=0, **_targeted(bits))
        except openai.InternalServerError as e:
            return e

    before = _stable_samples(server.base_url)
    alone = complete(2.0)
    after = _stable_samples(server.base_url)
    assert not isinstance(alone, Exception), alone

    def moved(bits):
        return (_sum(after, "d2moe_width_pairs_total", layer=str(DAMAGED_LAYER), bits=str(bits))
                - _sum(before, "d2moe_width_pairs_total", layer=str(DAMAGED_LAYER), bits=str(bits)))

    tokens = alone.usage.prompt_tokens + alone.usage.completion_tokens - 1  # the last one is not fed back
    assert moved(2) + moved(3) == 2 * tokens and moved(2) > 0  # top-2 experts per token
    assert moved(DAMAGED_BITS) == 0

    with ThreadPoolExecutor(4) as threads:
        replies = list(threads.map(complete, [2.0, DAMAGED_BITS, 2.0, DAMAGED_BITS]))
    for cheap in replies[::2]:
        assert not isinstance(cheap, Exception), cheap
        assert cheap.choices[0].text == alone.choices[0].text
    for precise in replies[1::2]:
        assert isinstance(precise, openai.InternalServerError) and EXPERT_FAILURE.search(str(precise)), precise
