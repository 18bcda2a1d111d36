"""vLLM's default process layout (engine core and worker spawned) against the engine core in the
test's own process: the same greedy outputs, and the offload and width statistics read from the
workers through ``vllm_d2moe.engine_stats`` (the session's engine runs, ``conftest.engine_results``)."""

import pytest

from conftest import ROUTER_WIDTHS, routed_budget

PAIRS = ["mixtral/d2moe-2", "mixtral/routed-budget"]  # a fixed width; the router under a budget


def _ok(results: dict, name: str) -> dict:
    assert "error" not in results[name], results[name].get("error")
    return results[name]


@pytest.mark.parametrize("name", PAIRS)
def test_default_layout_runs_the_engine_in_another_process(engine_results, name):
    spawned, in_process = _ok(engine_results, name), _ok(engine_results, f"{name}/in-process")
    assert spawned["engine_pid"] != spawned["runner_pid"]
    assert in_process["engine_pid"] == in_process["runner_pid"]


@pytest.mark.parametrize("name", PAIRS)
def test_greedy_outputs_do_not_depend_on_the_process_layout(engine_results, name):
    spawned, in_process = _ok(engine_results, name), _ok(engine_results, f"{name}/in-process")
    assert [o["token_ids"] for o in spawned["outputs"]] == [o["token_ids"] for o in in_process["outputs"]]
    assert all(o["token_ids"] for o in spawned["outputs"])


@pytest.mark.parametrize("name", PAIRS)
def test_width_statistics_reach_the_caller_in_both_layouts(engine_results, name):
    spawned, in_process = _ok(engine_results, name), _ok(engine_results, f"{name}/in-process")
    widths = spawned["widths"]
    assert widths["per_layer"], "no width statistics came back from the engine's worker"
    assert widths == in_process["widths"]
    served_bits = {int(b) for histogram in widths["per_layer"].values() for b in histogram}
    if name == "mixtral/d2moe-2":
        assert served_bits == {2} and widths["average_bits"] == 2.0
    else:
        assert served_bits <= set(ROUTER_WIDTHS) and len(served_bits) > 1
        assert min(ROUTER_WIDTHS) < widths["average_bits"] < max(ROUTER_WIDTHS)


def test_budgeted_engine_reports_its_reads_from_the_spawned_worker(engine_results, routed_mixtral):
    spawned = _ok(engine_results, "mixtral/routed-budget")
    (pool,) = spawned["offload_metrics"]  # the worker's one offload manager
    assert pool["pool"]["budget_bytes"] == routed_budget(routed_mixtral)
    assert pool["pool"]["occupied_slots"] > 0
    total = pool["total"]
    assert total["misses"] > 0 and total["bytes_read"] > 0 and total["calls"] > 0
    assert set(pool["layers"]) == {"0", "1"}  # JSON keys
    # Not equal to the in-process counts: the batches, hence the layer calls, may differ.
    (in_process,) = _ok(engine_results, "mixtral/routed-budget/in-process")["offload_metrics"]
    assert in_process["total"]["misses"] > 0


def test_unbudgeted_engine_has_no_offload_pool(engine_results):
    assert _ok(engine_results, "mixtral/d2moe-2")["offload_metrics"] == []
