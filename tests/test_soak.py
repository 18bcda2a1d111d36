"""The soak harness (``vllm_d2moe.testing.soak``, run long by ``benchmarks/soak.py``): the store's
injected read faults, and a one-minute soak of 32 concurrent OpenAI clients against ``d2moe serve``
of the embedded model streaming its experts, with one expert blob corrupted on the served copy
while it runs."""

import json
import time

import pytest

from vllm_d2moe.mwq.checkpoint import CheckpointError, MWQCheckpoint
from vllm_d2moe.offload.injected_faults import ENV_VARIABLE
from vllm_d2moe.offload.store import ExpertStore
from vllm_d2moe.testing.soak import classify, rss_growth, soak_requests, soak_run, tree_memory, write_injected_faults


@pytest.fixture(scope="module")
def embedded_d2moe(tmp_path_factory):
    """The embedded reference model converted as ``d2moe demo`` converts it."""
    from pathlib import Path

    import vllm_d2moe
    from vllm_d2moe.converters.convert import convert
    from vllm_d2moe.mwq.quantize import MWQSpec

    embedded = Path(vllm_d2moe.__file__).parent / "assets" / "reference-small"
    return convert(embedded, tmp_path_factory.mktemp("embedded") / "reference-small-d2moe", MWQSpec(2, 8, 128),
                   progress=False)


def test_injected_read_faults_are_off_unless_asked_and_follow_their_file(embedded_d2moe, tmp_path, monkeypatch):
    checkpoint = MWQCheckpoint(embedded_d2moe)
    monkeypatch.delenv(ENV_VARIABLE, raising=False)
    assert ExpertStore(checkpoint)._injected is None
    control = tmp_path / "faults.json"
    monkeypatch.setenv(ENV_VARIABLE, str(control))
    store = ExpertStore(checkpoint)
    intact = store.read(1, 2, 0, 6).data.clone()  # no file yet: nothing injected
    write_injected_faults(control, fail=((1, 2),))
    with pytest.raises(CheckpointError, match=r"injected read error .* of layer 1 expert 2 \(after 3 attempts\)"):
        store.read(1, 2, 0, 6)
    assert store.read(1, 3, 0, 6).nbytes > 0  # another expert reads
    assert store.intact_width(1, 2) is None  # a read error is not damage: nothing remembered
    write_injected_faults(control, delay_s=0.05)
    started = time.monotonic()
    assert bool((store.read(1, 2, 0, 6).data == intact).all())
    assert time.monotonic() - started >= 0.05
    control.write_text("not json")
    assert bool((store.read(1, 2, 0, 6).data == intact).all())
    store.close()


def test_classify_blames_only_a_faulted_expert():
    (request,) = [r for r in soak_requests(1024) if r.kind == "completion"][:1]
    expected = {"status": 200, "texts": ["abc"], "finish": ["length"]}
    faulted = {(2, 3): ("corrupt", None), (1, 0): ("read errors", 10.0)}
    assert classify(request, expected, expected, faulted) == ("ok", None)
    assert classify(request, {**expected, "texts": ["abd"]}, expected, faulted) == ("wrong", None)
    failure = {"status": 500, "error": "MoE layer 2 expert 3 at 8 bits could not be read: checksum mismatch"}
    assert classify(request, failure, expected, faulted) == ("failed_by_fault", "corrupt")
    other = {"status": 500, "error": "MoE layer 2 expert 4 at 8 bits could not be read: checksum mismatch"}
    assert classify(request, other, expected, faulted) == ("unexplained", None)
    assert classify(request, {"status": 500, "error": "Internal server error"}, expected, faulted)[0] == "unexplained"
    # Read errors injected until t = 10 s: a request sent before then may fail of them, one sent later may not.
    read_error = {"status": 200, "error": "MoE layer 1 expert 0 at 8 bits could not be read: injected read error"}
    assert classify(request, read_error, expected, faulted, started_s=9.0) == ("failed_by_fault", "read errors")
    assert classify(request, read_error, expected, faulted, started_s=11.0) == ("unexplained", None)


def test_request_set_covers_every_kind():
    kinds = {r.kind for r in soak_requests(1024)}
    assert kinds == {"completion", "stream", "n2", "stop", "logprobs", "chat", "long", "too_long", "empty",
                     "empty_chat", "abandon_stream", "cancel"}
    targeted = soak_requests(1024, targets=(2.0, 4.0))
    assert {json.dumps(r.arguments.get("extra_body")) for r in targeted if r.checked} == {
        json.dumps({"vllm_xargs": {"d2moe_target_bits": t}}) for t in (2.0, 4.0)}


def test_tree_memory_counts_each_process_and_growth_is_a_slope():
    import os
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(60)"])

    def child_anon(memory):
        return next((v for k, v in memory["anon_by_process"].items() if k.endswith(f":{child.pid}")), 0)

    try:
        deadline = time.monotonic() + 30
        while True:  # until the child has touched its 64 MiB
            memory = tree_memory(os.getpid())
            if child_anon(memory) > 64 << 20 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        child.kill()
        child.wait()
    assert child_anon(memory) > 64 << 20
    assert memory["anon_bytes"] == sum(memory["anon_by_process"].values())
    assert 0 < memory["anon_bytes"] <= memory["rss_bytes"]
    # 36 MB/h on a mean of 1 GB: +3.6 %/h; flat: 0
    rising = [{"t_s": t, "anon": 1e9 + 10_000 * (t - 50)} for t in range(0, 101, 5)]
    assert rss_growth(rising, "anon")["growth_pct_per_hour"] == pytest.approx(3.6)
    assert rss_growth([{"t_s": t, "anon": 5e8} for t in range(5)], "anon")["growth_pct_per_hour"] == 0


@pytest.mark.extended
def test_mini_soak_with_a_corrupt_blob(embedded_d2moe, tmp_path, report):
    """32 clients for 60 s at a budget of a third of the 8-bit experts (streaming); half-way, one
    byte of one expert's widest plane is flipped on the served copy: requests that need it fail
    naming it, every other answer equals the all-resident one sent alone, none is lost, the server
    lives."""
    spec = MWQCheckpoint(embedded_d2moe).spec
    result = soak_run(
        embedded_d2moe, tmp_path, quantization_config={"memory_budget": "4MiB", "on_read_error": "fail"},
        server_args=("--dtype", "float32", "--gpu-memory-utilization", "0.3", "--enforce-eager"),
        clients=32, duration_s=60, max_model_len=1024, section=spec.max_bits - spec.min_bits,
        fault_kinds=("corrupt",), fault_at={"corrupt": 0.5}, sample_every_s=2.0, progress=lambda _: None,
    )
    summary = result.summary()
    outcomes = summary["outcomes"]
    report.add(f"mini-soak: {summary['requests']} requests, {json.dumps(outcomes)}, "
               f"p50 {summary['latency_s']['p50']:.2f} s, p99 {summary['latency_s']['p99']:.2f} s")
    bad = [r for r in result.records if r["outcome"] in ("wrong", "unexplained", "lost")]
    assert not bad, bad[:3]
    assert outcomes.get("ok", 0) > 0
    (corrupt,) = [f["name"] for f in result.faults]
    assert outcomes.get("failed_by_fault", 0) > 0 and set(summary["failures_by_fault"]) == {corrupt}
    assert summary["pool_bounded"] and summary["alive_at_end"] and summary["healthy_at_end"]
    assert summary["violations"] == []
