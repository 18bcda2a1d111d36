"""``d2moe serve`` (vLLM's OpenAI server) on a d2moe checkpoint, through the OpenAI client and
its ``/metrics``. The server runs in vLLM's default process layout (engine core and worker
spawned) with a memory budget, so the d2moe series on ``/metrics`` come from another process."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
from vllm_d2moe.offload.pool import expert_nbytes

from conftest import ENGINE_ENV, PROMPTS

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(args: list[str], log_path) -> subprocess.Popen:
    # vLLM's default layout, whatever the caller's environment; serve.py makes its own metrics dir.
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return subprocess.Popen(
        [sys.executable, "-m", "vllm_d2moe.cli", "serve", *args],
        env={**env, **ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
    )


class Server:
    def __init__(self, client: openai.OpenAI, model: str, base_url: str, budget: int):
        self.client, self.model, self.base_url, self.budget = client, model, base_url, budget


@pytest.fixture(scope="session")
def server(model_zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    template = tmp / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    port = _free_port()
    model = str(model_zoo["mixtral"]["d2moe"])
    # Three of the 16 experts at 8 bits: most layer calls read from disk.
    budget = 3 * expert_nbytes(MWQCheckpoint(model).layer(0).layout, 8) + 256
    overrides = json.dumps({"quantization_config": {"quant_method": "d2moe", "memory_budget": budget}})
    log = tmp / "server.log"
    proc = _serve(
        [model, "--quantization", "d2moe", "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.3",
         "--enforce-eager", "--chat-template", str(template), "--hf-overrides", overrides],
        log,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"server not healthy after 300 s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield Server(openai.OpenAI(base_url=f"{base}/v1", api_key="unused"), model, base, budget)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_completion_matches_offline_engine(server, engine_results):
    # Offline: all experts resident; served: streamed through the budget. Same tokens.
    reply = server.client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=16, temperature=0)
    offline = engine_results["mixtral/d2moe-8"]["outputs"][0]["text"]
    assert reply.choices[0].text == offline


def test_chat_completion(server):
    reply = server.client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Write a parser."}],
        max_tokens=12,
        temperature=0,
    )
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0


def test_invalid_width_option_stops_the_server(model_zoo, tmp_path):
    overrides = json.dumps({"quantization_config": {"quant_method": "d2moe", "bits": 9}})
    proc = _serve([str(model_zoo["mixtral"]["d2moe"]), "--hf-overrides", overrides], tmp_path / "log")
    assert proc.wait(timeout=300) != 0
    assert "d2moe option 'bits' must be an integer in [1, 8], got 9" in (tmp_path / "log").read_text()


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
