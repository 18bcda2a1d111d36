"""Cross-layer prefetch in the offload pipeline (option ``prefetch``).

Pipeline tests drive an :class:`OffloadManager` directly with hand-made forecasts and watch the
order of reads through the store (one I/O thread, held at a gate while the queue fills): a
layer's demand reads first, then prefetches nearest layer first, hottest expert and lowest width
first; a later demand read passes queued prefetches. Outputs are compared with the same
checkpoint held resident (rtol 1e-5, as ``test_offload.py``), under budgets from one expert up
and forecasts that are mostly wrong. Serving tests run vLLM on the session's tiny Mixtral with
each predictor and compare greedy tokens with prefetch off, while a sampler watches the pool.
"""

import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import wait
from pathlib import Path

import pytest
import torch

from vllm_d2moe.experts import load_layer_experts
from vllm_d2moe.kernels import load_backend
from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
from vllm_d2moe.offload import OffloadManager
from vllm_d2moe.offload.pipeline import OffloadPolicy
from vllm_d2moe.offload.pool import expert_nbytes
from vllm_d2moe.offload.sampling import current_rss_bytes
from vllm_d2moe.testing.engine_runs import Run

from conftest import PROMPTS, ROUTER_WIDTHS, check_streamed_run, routed_budget, run_engines

MIN_BITS, MAX_BITS = 2, 8  # the session model_zoo conversion's widths
EXPERTS = 8


def budget_for(checkpoint: MWQCheckpoint, slots: int) -> int:
    # A few bytes over: the CPU kernel's layout adds read slack per tensor.
    return slots * expert_nbytes(checkpoint.layer(0).layout, MAX_BITS) + 1024


def call(experts: list[int], width: int, seed: int):
    """One layer call: token ``t`` routed to ``experts[t]`` at ``width`` (its second pair on another rank)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[e, -1] for e in experts])
    return (torch.randn(len(experts), 128, generator=gen), torch.rand(len(experts), 2, generator=gen), ids,
            torch.full(ids.shape, width, dtype=torch.int8))


def settle(manager: OffloadManager) -> None:
    """Wait until no prefetch reads any more, and install what they read (as the next call would
    first: otherwise whether one is counted yet depends on how fast the last call ran)."""
    wait([load.future for load in list(manager.pipeline._prefetches.values())])
    manager.pipeline._reap()


def gated_reads(manager: OffloadManager, gates: dict[int, threading.Event]) -> list[tuple[int, int, int]]:
    """Record ``(layer, expert, width)`` of every read the store starts; read number ``i`` waits for
    ``gates[i]`` first (so that the queue fills behind it)."""
    reads, read = [], manager.store.read

    def gated(layer, expert, first, last, scratch=False):
        reads.append((layer, expert, MIN_BITS + last))
        if len(reads) - 1 in gates:
            assert gates[len(reads) - 1].wait(30)
        return read(layer, expert, first, last, scratch)

    manager.store.read = gated
    return reads


def opened_later(gate: threading.Event, seconds: float = 0.5) -> None:
    threading.Timer(seconds, gate.set).start()


def test_queue_order_demand_first_then_nearest_layer_hottest_lowest_width(checkpoint):
    backend = load_backend("cpu_bitplanes")
    manager = OffloadManager(checkpoint, budget_for(checkpoint, 20), MAX_BITS, OffloadPolicy(io_threads=1), backend)
    layers = [manager.layer(layer, list(range(EXPERTS)), MAX_BITS) for layer in (0, 1)]
    resident = [load_layer_experts(checkpoint, layer, list(range(EXPERTS)), MAX_BITS, 0, 1, backend)
                for layer in (0, 1)]
    gates = {0: threading.Event(), 6: threading.Event()}
    reads = gated_reads(manager, gates)

    # Layer 0 needs expert 5 (3 tokens) and 2 (1 token); forecasts for layer 1 (depth 1) and, for
    # the order only, experts of layer 0 as if two layers ahead.
    args = call([5, 5, 5, 2], 4, seed=0)
    forecasts = [(1, 1, {6: (1, 2), 3: (3, 4), 0: (3, 2)}), (0, 2, {7: (5, 2)})]
    opened_later(gates[0])
    torch.testing.assert_close(layers[0].forward(*args, forecasts), resident[0].forward(*args), rtol=1e-5, atol=1e-6)
    settle(manager)
    assert reads == [(0, 5, 4), (0, 2, 4), (1, 0, 2), (1, 3, 4), (1, 6, 2), (0, 7, 2)]

    # Layer 1 needs what was prefetched for it (no read); its forecasts queue two reads, the first
    # held at the gate; then layer 0 needs expert 6, predicted by nobody: read before the queued one.
    args = [call([0, 3, 3], 2, seed=1), call([6], 8, seed=2)]
    args[0][3][1:, 0] = 4  # expert 3 at 4 bits, as predicted
    torch.testing.assert_close(layers[1].forward(*args[0], [(0, 1, {1: (1, 2)}), (1, 2, {4: (1, 2)})]),
                               resident[1].forward(*args[0]), rtol=1e-5, atol=1e-6)
    # The first is held at the gate once the I/O thread took it (on a loaded machine that can come after
    # this thread's next call began, which would cancel it as not started).
    deadline = time.monotonic() + 30
    while len(reads) < 7 and time.monotonic() < deadline:
        time.sleep(0.01)
    opened_later(gates[6])
    torch.testing.assert_close(layers[0].forward(*args[1]), resident[0].forward(*args[1]), rtol=1e-5, atol=1e-6)
    settle(manager)
    assert reads[6:] == [(0, 1, 2), (0, 6, 8), (1, 4, 2)]

    snapshot = manager.metrics.snapshot()
    layer1 = snapshot["layers"][1]
    assert layer1["prefetch_reads"] == 4 and layer1["prefetch_hits"] == 2 and layer1["misses"] == 0
    assert layer1["bytes_wasted"] == expert_nbytes(checkpoint.layer(1).layout, 2)  # expert 6, not needed
    scored = snapshot["prefetch"]["layers"][1][1]
    assert (scored["needed_pairs"], scored["covered_pairs"], scored["predicted_experts"], scored["used_experts"]) \
        == (2, 2, 3, 2)
    assert scored["recall"] == 1.0 and scored["precision"] == pytest.approx(2 / 3)
    assert snapshot["prefetch"]["layers"][0][2]["covered_pairs"] == 0  # expert 7 predicted, 6 needed
    manager.pipeline.close()


@pytest.mark.parametrize("slots", [1, 2, 3, 20])
def test_outputs_equal_resident_within_the_pool_and_without_leaks(checkpoint, slots):
    """Alternating layer calls with random forecasts (mostly wrong, some right, at random widths):
    the outputs are the resident layers', the pool never holds more than its slots, nothing stays
    pinned once the prefetches are done, and the process does not grow."""
    backend = load_backend("cpu_bitplanes")
    manager = OffloadManager(checkpoint, budget_for(checkpoint, slots), MAX_BITS, OffloadPolicy(), backend)
    layers = [manager.layer(layer, list(range(EXPERTS)), MAX_BITS) for layer in (0, 1)]
    resident = [load_layer_experts(checkpoint, layer, list(range(EXPERTS)), MAX_BITS, 0, 1, backend)
                for layer in (0, 1)]
    gen = torch.Generator().manual_seed(slots)

    def step(i: int) -> None:
        layer = i % 2
        tokens = 1 + i % 5
        x = torch.randn(tokens, 128, generator=gen)
        weights = torch.rand(tokens, 2, generator=gen)
        ids = torch.randint(-1, EXPERTS, (tokens, 2), generator=gen)
        widths = torch.randint(MIN_BITS, MAX_BITS + 1, (tokens, 2), generator=gen).to(torch.int8)
        guesses = torch.randint(0, EXPERTS, (3,), generator=gen).tolist()
        forecasts = [(1 - layer, 1, {e: (1 + k, int(torch.randint(MIN_BITS, MAX_BITS + 1, (), generator=gen)))
                                     for k, e in enumerate(guesses)})]
        torch.testing.assert_close(layers[layer].forward(x, weights, ids, widths, forecasts),
                                   resident[layer].forward(x, weights, ids, widths), rtol=1e-5, atol=1e-6)
        assert manager.pool.occupied <= manager.pool.num_slots

    for i in range(40):  # warm-up: the allocator's pools fill
        step(i)
    rss = current_rss_bytes()
    for i in range(40, 240):
        step(i)
    settle(manager)
    manager.pipeline._reap()
    assert not manager.pool.pinned
    assert current_rss_bytes() - rss < 16 * 2**20
    total = manager.metrics.snapshot()["total"]
    if slots >= 3:  # room for a call's experts and a prefetch
        assert total["prefetch_reads"] > 0 and total["bytes_prefetched"] > 0
    assert total["bytes_wasted"] <= total["bytes_prefetched"]
    manager.pipeline.close()


def test_expert_parallel_rank_prefetches_only_its_experts(checkpoint):
    backend = load_backend("cpu_bitplanes")
    manager = OffloadManager(checkpoint, budget_for(checkpoint, 8), MAX_BITS, OffloadPolicy(), backend)
    mine = [1, 3, 4, 6, 7]
    layers = [manager.layer(layer, mine, MAX_BITS) for layer in (0, 1)]
    resident = load_layer_experts(checkpoint, 0, mine, MAX_BITS, 0, 1, backend)
    args = call([0, 2], 8, seed=3)  # local ids: experts 1 and 4
    forecasts = [(1, 1, {0: (1, 8), 3: (2, 8), 5: (1, 8), 6: (1, 4)})]
    torch.testing.assert_close(layers[0].forward(*args, forecasts), resident.forward(*args), rtol=1e-5, atol=1e-6)
    settle(manager)
    manager.pipeline._reap()
    assert sorted(e for layer, e, _ in manager.pool.entries() if layer == 1) == [3, 6]
    manager.pipeline.close()


def test_option_errors_name_the_option(model):
    from vllm_d2moe.vllm_glue.quant_config import D2MoEConfig

    def config(**options):
        return D2MoEConfig.from_config({"quant_method": "d2moe", **options})

    with pytest.raises(ValueError, match="d2moe option 'prefetch' needs 'memory_budget'"):
        config(prefetch={"predictor": "gate"})
    with pytest.raises(ValueError, match=r"prefetch.predictor must be one of \['gate', 'learned'\], got 'shadow'"):
        config(prefetch={"predictor": "shadow"}, memory_budget="1MiB")
    with pytest.raises(ValueError, match="prefetch.depth must be an integer >= 1, got 0"):
        config(prefetch={"predictor": "gate", "depth": 0}, memory_budget="1MiB")
    with pytest.raises(ValueError, match="'prefetch' must be a dict with 'predictor'"):
        config(prefetch={"predictor": "gate", "ahead": 2}, memory_budget="1MiB")
    with pytest.raises(ValueError, match="needs offload.overlap and offload.keep"):
        config(prefetch={"predictor": "gate"}, memory_budget="1MiB", offload={"keep": False})
    gate = config(prefetch={"predictor": "gate", "depth": 2}, memory_budget="1MiB")
    gate.maybe_update_config(str(model))
    assert gate.predictor().depth == 2 and gate.prefetch == {"predictor": "gate", "depth": 2, "extra": 0}


# ---------------------------------------------------------------- served by vLLM


@pytest.fixture(scope="module")
def learned_model(model, tmp_path_factory) -> Path:
    """A copy of the tiny Mixtral with a learned predictor trained by the CLI (a few steps)."""
    copy = tmp_path_factory.mktemp("learned") / "mixtral"
    shutil.copytree(model, copy)
    subprocess.run([sys.executable, "-m", "vllm_d2moe.cli", "train-predictor", str(copy), "--tokens", "2048",
                    "--window", "64", "--depth", "1", "--width", "16", "--steps", "30", "--batch-size", "64"],
                   check=True, capture_output=True, text=True, timeout=600)
    return copy


@pytest.fixture(scope="module")
def bad_predictors(model, learned_model, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny Mixtral holding the learned predictor's file cut short, and holding it
    beside another conversion (its index differs)."""
    from vllm_d2moe.prefetch.learned import predictor_path

    copies = {}
    for name in ("corrupt", "foreign"):
        copies[name] = tmp_path_factory.mktemp(name) / "mixtral"
        shutil.copytree(model, copies[name])
    predictor_path(copies["corrupt"]).write_bytes(predictor_path(learned_model).read_bytes()[:300])
    index = copies["foreign"] / "d2moe" / "index.json"
    index.write_text(index.read_text() + " ")
    shutil.copy(predictor_path(learned_model), predictor_path(copies["foreign"]))
    return copies


def _run(name: str, model: Path, budget: int | None, prefetch: dict | None = None, **kwargs) -> Run:
    config = {"quant_method": "d2moe"}
    if budget is not None:
        config["memory_budget"] = budget
    if prefetch is not None:
        config["prefetch"] = prefetch
    return Run(name, str(model), PROMPTS, hf_overrides={"quantization_config": {**config, **kwargs.pop("options", {})}},
               **kwargs)


@pytest.fixture(scope="module")
def served(model, checkpoint, learned_model, bad_predictors, routed_mixtral, tmp_path_factory) -> dict:
    # Half the experts (8 of 16): a call's experts leave slots for the next layer's.
    budget = budget_for(checkpoint, 8)
    routed = routed_budget(routed_mixtral, experts=8)
    targets = [{"d2moe_target_bits": t} for t in (2.0, 4.0, 2.0, 4.0)]
    routed_options = {"capacities": "off"}
    runs = [
        _run("resident", model, None, sample_offload=True),
        _run("streamed", model, budget, sample_offload=True),
        # Depth 2 on two MoE layers predicts the one next layer.
        _run("gate", model, budget, {"predictor": "gate", "depth": 2, "extra": 1}, sample_offload=True),
        _run("learned", learned_model, budget, {"predictor": "learned"}, sample_offload=True),
        # The router's widths with per-request targets, with and without prefetch.
        _run("routed", routed_mixtral, routed, extra_args=targets, options=routed_options, in_process=True),
        _run("routed-gate", routed_mixtral, routed, {"predictor": "gate", "extra": 1}, extra_args=targets,
             options=routed_options, sample_offload=True),
        _run("no-budget", model, None, {"predictor": "gate"}, in_process=True),
        _run("learned-missing", model, budget, {"predictor": "learned"}, in_process=True),
        *(_run(f"learned-{name}", copy, budget, {"predictor": "learned"}, in_process=True)
          for name, copy in bad_predictors.items()),
    ]
    results, _ = run_engines(runs, tmp_path_factory.mktemp("prefetch-engines"))
    return results


@pytest.fixture(scope="module")
def served_tp(model, checkpoint, tmp_path_factory) -> dict:
    """vLLM's default process layout (engine core and two tensor-parallel workers spawned), compiled,
    with and without prefetch (tensor parallelism sums in another order than one process)."""
    budget = budget_for(checkpoint, 8)
    tp = [_run(f"tp2-{name}", model, budget, prefetch, tensor_parallel_size=2, enforce_eager=False)
          for name, prefetch in (("streamed", None), ("gate", {"predictor": "gate", "extra": 1}))]
    results, _ = run_engines(tp, tmp_path_factory.mktemp("prefetch-tp-engines"),
                             extra_env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    return results


def _tokens(served: dict, name: str) -> list:
    assert "error" not in served[name], served[name].get("error")
    return [o["token_ids"] for o in served[name]["outputs"]]


def _forecast_counts(metrics: dict) -> dict:
    """Depth 1's forecast counters of one offload snapshot (keys are strings once through JSON)."""
    depths = metrics["prefetch"]["depths"]
    return depths.get("1", depths.get(1))


def _prefetch_report(metrics: list[dict]) -> str:
    total = {k: sum(m["total"][k] for m in metrics) for k in ("prefetch_reads", "bytes_prefetched", "bytes_wasted",
                                                                "misses", "prefetch_hits")}
    depths = metrics[0]["prefetch"]["depths"]
    recall = ", ".join(f"depth {d}: recall {c['recall']:.0%} precision {c['precision']:.0%}"
                       for d, c in depths.items() if c["recall"] is not None)
    return (f"{total['prefetch_reads']} prefetch reads ({total['bytes_prefetched']} B, {total['bytes_wasted']} B "
            f"unused), {total['prefetch_hits']} prefetch hits, {total['misses']} demand reads left; {recall}")


@pytest.mark.parametrize("name", ["gate", "learned"])
def test_served_tokens_with_prefetch_equal_without_and_stay_in_budget(served, report, name):
    assert _tokens(served, name) == _tokens(served, "streamed") == _tokens(served, "resident")
    report.add(f"prefetch {name}: {check_streamed_run(served, name)}")
    (metrics,) = served[name]["offload"]["metrics"]
    # The predictor ran in the engine and its forecasts were scored. (Whether a prefetch finds a slot
    # depends on the pool: once full of experts routed every step, none is colder than a forecast.)
    assert _forecast_counts(metrics)["predicted_experts"] > 0
    assert metrics["total"]["bytes_wasted"] <= metrics["total"]["bytes_prefetched"]
    report.add(f"prefetch {name}: {_prefetch_report([metrics])}")


@pytest.mark.extended
def test_served_with_prefetch_in_the_default_layout_compiled_under_tp(served_tp, report):
    assert _tokens(served_tp, "tp2-gate") == _tokens(served_tp, "tp2-streamed")
    metrics = served_tp["tp2-gate"]["offload_metrics"]
    assert len(metrics) == 1  # rank 0's worker process (engine_stats answers one worker's), one manager
    assert _forecast_counts(metrics[0])["predicted_experts"] > 0
    report.add(f"prefetch tp2-gate (compiled): {_prefetch_report(metrics)}")


def test_served_router_widths_with_per_request_targets(served, report):
    assert _tokens(served, "routed-gate") == _tokens(served, "routed")
    (metrics,) = served["routed-gate"]["offload"]["metrics"]
    assert _forecast_counts(metrics)["predicted_experts"] > 0
    assert served["routed-gate"]["offload"]["max_occupancy_bytes"] <= served["routed-gate"]["offload"]["budget_bytes"]
    widths = {int(b) for layer in served["routed-gate"]["widths"]["per_layer"].values() for b in layer}
    assert widths <= set(ROUTER_WIDTHS) and len(widths) > 1
    report.add(f"prefetch routed-gate: {_prefetch_report([metrics])}")


def test_served_start_up_errors_name_the_option_or_file(served):
    assert "prefetch' needs 'memory_budget'" in served["no-budget"]["error"]
    assert "has no learned expert predictor" in served["learned-missing"]["error"]
    assert "predictor.safetensors is missing" in served["learned-missing"]["error"]
    assert "predictor.safetensors: unreadable expert predictor file" in served["learned-corrupt"]["error"]
    assert "predictor.safetensors was trained for another conversion" in served["learned-foreign"]["error"]
