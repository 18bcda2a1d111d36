"""Data-parallel replicas as Ray actors on CPU: two single-core vLLM replicas give the
single-process run's greedy outputs, a failed replica's prompts are retried on the
other one (offline batches and the serving front), and a chunk whose ``generate`` raised
is retried once elsewhere, its failures recorded."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

ray = pytest.importorskip(
    "ray", reason="Ray is not installed: `bash scripts/install.sh test` (what `make test` runs) installs it"
)

from vllm_d2moe.replicas.batch import ReplicaPool  # noqa: E402
from vllm_d2moe.replicas.cluster import local_cluster  # noqa: E402
from vllm_d2moe.replicas.spec import ReplicaSpec  # noqa: E402
from vllm_d2moe.testing.engine_runs import Run  # noqa: E402

from conftest import PROMPTS, run_engines  # noqa: E402

pytestmark = pytest.mark.slow

BATCH = PROMPTS * 2  # 8 prompts: 4 chunks of 2, so both replicas get several
MAX_TOKENS = 16
SAMPLING = {"max_tokens": MAX_TOKENS, "temperature": 0.0}
ENGINE_OPTIONS = [
    "--quantization",
    "d2moe",
    "--dtype",
    "float32",
    "--max-model-len",
    "512",
    "--enforce-eager",
]


def memory_budget(budget: str) -> dict:
    return {"quantization_config": {"quant_method": "d2moe", "memory_budget": budget}}


@pytest.fixture(scope="module")
def model(model_zoo) -> str:
    return str(model_zoo["mixtral"]["d2moe"])


@pytest.fixture(scope="module")
def single_process(model, tmp_path_factory) -> list[dict]:
    run = Run("single", model, BATCH, quantization="d2moe", max_tokens=MAX_TOKENS)
    results, _ = run_engines([run], tmp_path_factory.mktemp("single"))
    assert "error" not in results["single"], results["single"]["error"]
    return results["single"]["outputs"]


# Replica 1's context: the prompts of BATCH fit, a prompt of MEDIUM_PROMPT_TOKENS does not
# (its generate raises there and not on replica 0).
SHORT_CONTEXT = 64
MEDIUM_PROMPT_TOKENS, LONG_PROMPT_TOKENS = 200, 600


@pytest.fixture(scope="class")
def pool(model):
    specs = [
        ReplicaSpec(model, core=i, quantization="d2moe", dtype="float32",
                    max_model_len=512 if i == 0 else SHORT_CONTEXT, enforce_eager=True)
        for i in range(2)
    ]
    with local_cluster(num_cpus=2, show_replica_logs=False):
        replicas = ReplicaPool(specs)
        try:
            yield replicas
        finally:
            replicas.close()


def assert_same_tokens(results: dict[int, dict], reference: list[dict]) -> None:
    assert sorted(results) == list(range(len(reference)))
    for index, expected in enumerate(reference):
        assert results[index]["token_ids"] == expected["token_ids"], f"prompt {index}"
        assert results[index]["text"] == expected["text"]


@pytest.mark.extended
class TestReplicaPool:
    """Both tests share one pool (two engines); it is shut down before the command tests start theirs."""

    def test_two_replicas_match_single_process(self, pool, single_process, report):
        start = time.monotonic()
        results = dict(pool.generate(BATCH, SAMPLING, chunk_size=2))
        elapsed = time.monotonic() - start
        report.add(
            f"ray-batch: 8 prompts x {MAX_TOKENS} tokens on 2 replicas in {elapsed:.1f} s "
            "(from actor start, engines loading in parallel with the single-process run)"
        )
        assert_same_tokens(results, single_process)
        assert {r["replica"] for r in results.values()} == {0, 1}
        assert pool.failures == {}

    def test_a_raising_generate_is_retried_once_on_the_other_replica(self, pool, single_process, model):
        """Chunks of one prompt: the medium prompt goes to replica 1 first (the second chunk) and
        raises there, then completes on replica 0; the long one raises on both and is reported;
        every other prompt completes and both replicas stay in the pool."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)

        def prompt_of(tokens: int) -> str:  # about that many tokens
            ids = tokenizer("def parse(argv): " * tokens, add_special_tokens=False).input_ids
            return tokenizer.decode(ids[:tokens])

        batch = [PROMPTS[0], prompt_of(MEDIUM_PROMPT_TOKENS), PROMPTS[1], prompt_of(LONG_PROMPT_TOKENS)]
        task_failures = pool.task_failures
        results = dict(pool.generate(batch, SAMPLING, chunk_size=1))
        assert sorted(results) == [0, 1, 2, 3]
        for index, reference in ((0, single_process[0]), (2, single_process[1])):
            assert results[index]["token_ids"] == reference["token_ids"] and "failures" not in results[index]
        medium = results[1]
        assert medium["replica"] == 0 and len(medium["token_ids"]) == MAX_TOKENS
        (failure,) = medium["failures"]
        assert failure["replica"] == 1 and f"maximum context length is {SHORT_CONTEXT} tokens" in failure["error"]
        long = results[3]
        assert "token_ids" not in long and "maximum context length is" in long["error"]
        assert sorted(f["replica"] for f in long["failures"]) == [0, 1]
        assert pool.task_failures - task_failures == 3
        assert pool.failures == {}  # a raising generate drops no replica

    def test_killed_replica_chunks_go_to_the_other(self, pool, single_process):
        results = {}
        for index, result in pool.generate(BATCH, SAMPLING, chunk_size=1):
            if not results:  # both replicas have a chunk in flight now
                ray.kill(pool.actors[1])
            results[index] = result
        assert set(pool.failures) == {1}
        assert pool.retried_chunks == 1
        assert_same_tokens(results, single_process)
        late = [r["replica"] for r in results.values()][1:]
        assert late.count(1) <= 1  # at most the chunk it had finished before the kill was noticed


class _InProcessRay:
    """The Ray calls of ``ReplicaPool``, answered in this process (no cluster, no engines): replica
    ``r``'s ``generate`` raises (as a task error) for a prompt in ``raises[r]`` and otherwise
    returns each prompt as its text. Tasks finish in the order they were sent."""

    exceptions = ray.exceptions

    def __init__(self, raises: list[set[str]]):
        self.raises = raises

    def remote(self, num_cpus):  # ray.remote(num_cpus=1)(BatchReplica)
        return lambda _cls: _InProcessActors()

    def kill(self, _actor):
        pass

    def wait(self, refs, num_returns):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        replica, prompts = ref
        bad = [p for p in prompts if p in self.raises[replica]]
        if bad:
            cause = ValueError(f"cannot take {bad[0]!r}")
            raise ray.exceptions.RayTaskError("generate", f"ValueError: {cause}", cause).as_instanceof_cause()
        return [{"text": p} for p in prompts]


class _InProcessActors:
    """``actor.options(...).remote(spec)``: replicas numbered in start order; a task is its ref."""

    def __init__(self):
        self.started = 0

    def options(self, runtime_env):
        return self

    def remote(self, _spec):
        replica, self.started = self.started, self.started + 1
        return SimpleNamespace(generate=SimpleNamespace(remote=lambda prompts, _sampling: (replica, tuple(prompts))))


def _in_process_pool(monkeypatch, raises: list[set[str]]) -> ReplicaPool:
    monkeypatch.setattr("vllm_d2moe.replicas.batch.import_ray", lambda: _InProcessRay(raises))
    return ReplicaPool([ReplicaSpec("unused", core=i) for i in range(len(raises))])


@pytest.mark.parametrize("raises, outcome", [
    ([set(), {"b"}], {"replica": 0, "failed_on": [1]}),  # retried on the other replica, which answers
    ([{"b"}, {"b"}], {"error": "cannot take 'b'", "failed_on": [1, 0]}),  # fails there too: reported
    ([{"b"}], {"error": "cannot take 'b'", "failed_on": [0]}),  # no other replica to try
])
def test_a_raising_generate_is_retried_once_elsewhere_and_recorded(monkeypatch, raises, outcome):
    pool = _in_process_pool(monkeypatch, raises)
    prompts = ["a", "b", "c", "d"]
    results = dict(pool.generate(prompts, SAMPLING, chunk_size=1))
    assert sorted(results) == [0, 1, 2, 3]
    for index in (0, 2, 3):
        assert results[index]["text"] == prompts[index] and "failures" not in results[index]
    b = results[1]
    assert [f["replica"] for f in b["failures"]] == outcome["failed_on"]
    assert all("cannot take 'b'" in f["error"] for f in b["failures"])
    if "error" in outcome:
        assert outcome["error"] in b["error"] and "text" not in b and pool.failed_prompts == 1
    else:
        assert (b["text"], b["replica"]) == ("b", outcome["replica"]) and pool.failed_prompts == 0
    assert pool.task_failures == len(outcome["failed_on"]) and pool.failures == {}


@pytest.mark.extended
def test_ray_batch_command_with_a_replica_that_fails_to_start(model, single_process, tmp_path):
    """Per-replica budgets: replica 0 holds 2 of the 16 experts (120 KiB each at 8 bits) and
    streams the rest, with unchanged outputs; replica 1's budget is below one expert, so its
    engine refuses to start and its chunk goes to replica 0."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(BATCH)))
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_d2moe.cli",
            "ray-batch",
            model,
            *ENGINE_OPTIONS,
            "--replica-hf-overrides",
            json.dumps([memory_budget("300KiB"), memory_budget("1KiB")]),
            "--input",
            str(source),
            "--output",
            str(out),
            "--max-tokens",
            str(MAX_TOKENS),
            "--chunk-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "replica 1 failed" in proc.stderr
    assert "d2moe option 'memory_budget' is 1024 bytes" in proc.stderr
    assert "1 replica(s) failed, 1 chunk(s) retried" in proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == list(range(len(BATCH)))  # input order
    assert {r["replica"] for r in records} == {0}
    assert_same_tokens(dict(enumerate(records)), single_process)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post_completion(url: str, model: str, prompt: str) -> tuple[str, str]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
    request = urllib.request.Request(
        f"{url}/v1/completions", body.encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return reply.headers["X-D2MoE-Replica"], json.load(reply)["choices"][0]["text"]


def _servers_of(model: str) -> set[str]:
    found = subprocess.run(["pgrep", "-f", f"vllm_d2moe.cli serve {model}"], capture_output=True, text=True)
    return set(found.stdout.split())


@pytest.mark.extended
def test_ray_serve_front_balances_two_replicas(model, single_process, tmp_path):
    # Servers of the same model started by other tests (tests/test_openai_server.py's is
    # session-scoped) are not this command's replicas.
    servers_before = _servers_of(model)
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm_d2moe.cli",
            "ray-serve",
            model,
            *ENGINE_OPTIONS,
            "--port",
            str(port),
            "--log-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "front not healthy after 300 s"
                time.sleep(1)
        with ThreadPoolExecutor(4) as threads:
            replies = list(threads.map(lambda p: _post_completion(url, model, p), BATCH))
        assert {replica for replica, _ in replies} == {"0", "1"}
        assert [text for _, text in replies] == [o["text"] for o in single_process]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    assert not _servers_of(model) - servers_before, "a replica server outlived ray-serve"
