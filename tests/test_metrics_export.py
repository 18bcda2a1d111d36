"""vllm_glue/metrics.py without an engine: the Prometheus publisher over a real offload manager and
the width statistics, and the multiprocess directory ``d2moe serve`` sets up."""

import os
import subprocess
import sys

import pytest
import torch
from prometheus_client import CollectorRegistry

from vllm_d2moe.kernels import load_backend
from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
from vllm_d2moe.offload import OffloadManager, metrics_snapshots
from vllm_d2moe.offload.pipeline import OffloadPolicy
from vllm_d2moe.offload.pool import expert_nbytes
from vllm_d2moe.vllm_glue.metrics import MULTIPROC_DIR_VARIABLE, PrometheusPublisher
from vllm_d2moe.width_selection import WIDTH_STATS

LAYER = 1


@pytest.fixture
def offloaded_layer(model_zoo):
    checkpoint = MWQCheckpoint(model_zoo["mixtral"]["d2moe"])
    budget = 2 * expert_nbytes(checkpoint.layer(0).layout, 8) + 1024
    manager = OffloadManager(checkpoint, budget, 8, OffloadPolicy(), load_backend("cpu_bitplanes"))
    WIDTH_STATS.reset()
    yield manager, manager.layer(LAYER, list(range(8)), 8)
    WIDTH_STATS.reset()


def _call(layer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    tokens = 5
    ids = torch.randint(0, 8, (tokens, 2), generator=gen)
    layer.forward(torch.randn(tokens, 128, generator=gen), torch.rand(tokens, 2, generator=gen), ids,
                  torch.full((tokens, 2), 8, dtype=torch.int8))
    WIDTH_STATS.record_counts(LAYER, [0] * 8 + [ids.numel()])


def _layer_totals() -> dict[str, float]:
    """Layer ``LAYER``'s counts summed over every offload manager alive in this process."""
    totals = dict.fromkeys(("misses", "hits", "bytes_read", "wait_seconds"), 0)
    for snapshot in metrics_snapshots():
        for key in totals:
            totals[key] += snapshot["layers"].get(LAYER, {}).get(key, 0)
    return totals


def test_publisher_copies_the_counters_once_and_across_resets(offloaded_layer):
    manager, layer = offloaded_layer
    registry = CollectorRegistry()
    publisher = PrometheusPublisher(publish_widths=True, registry=registry)

    def sample(name, **labels):
        return registry.get_sample_value(name, labels)

    _call(layer, 0)
    first = _layer_totals()
    assert first["misses"] > 0
    publisher.publish()
    publisher.publish()  # nothing new: nothing added
    assert sample("d2moe_expert_reads_total", layer="1") == first["misses"]
    assert sample("d2moe_expert_hits_total", layer="1") == first["hits"]
    assert sample("d2moe_bytes_read_total", layer="1") == first["bytes_read"]
    assert sample("d2moe_read_wait_seconds_total", layer="1") == pytest.approx(first["wait_seconds"])
    assert sample("d2moe_pool_bytes", kind="budget") >= manager.pool.budget
    assert sample("d2moe_pool_bytes", kind="occupied") >= manager.pool.occupancy_nbytes > 0
    assert sample("d2moe_width_pairs_total", layer="1", bits="8") == 10
    assert sample("d2moe_average_bits") == 8.0

    ours = manager.metrics.snapshot()["layers"][LAYER]
    manager.metrics.reset()  # what engine_stats(llm, reset=True) does in the worker
    WIDTH_STATS.reset()
    _call(layer, 0)  # the same call again: counts that do not exceed the last published ones
    again = manager.metrics.snapshot()["layers"][LAYER]
    assert again["misses"] <= ours["misses"]
    publisher.publish()
    # Prometheus counters never go down: what was counted since the reset adds on.
    assert sample("d2moe_expert_reads_total", layer="1") == first["misses"] + again["misses"]
    assert sample("d2moe_bytes_read_total", layer="1") == first["bytes_read"] + again["bytes_read"]
    assert sample("d2moe_width_pairs_total", layer="1", bits="8") == 20


def test_widths_are_left_to_another_rank_when_asked(offloaded_layer):
    _, layer = offloaded_layer
    registry = CollectorRegistry()
    publisher = PrometheusPublisher(publish_widths=False, registry=registry)
    _call(layer, 0)
    publisher.publish()
    assert registry.get_sample_value("d2moe_width_pairs_total", {"layer": "1", "bits": "8"}) is None
    assert registry.get_sample_value("d2moe_expert_reads_total", {"layer": "1"}) > 0


def _in_fresh_process(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          check=False)


def test_serve_sets_a_fresh_multiprocess_directory_before_prometheus_loads():
    env = {k: v for k, v in os.environ.items() if k != MULTIPROC_DIR_VARIABLE}
    made = _in_fresh_process(
        "import os\n"
        "from vllm_d2moe.vllm_glue.metrics import use_multiprocess_prometheus\n"
        "path = use_multiprocess_prometheus()\n"
        "import prometheus_client.values as v\n"
        "print(path == os.environ['PROMETHEUS_MULTIPROC_DIR'], os.path.isdir(path), "
        "v.ValueClass.__name__)\n",
        env,
    )
    assert made.returncode == 0, made.stderr
    assert made.stdout.split() == ["True", "True", "MmapedValue"]
    late = _in_fresh_process(
        "import prometheus_client\n"
        "from vllm_d2moe.vllm_glue.metrics import use_multiprocess_prometheus\n"
        "use_multiprocess_prometheus()\n",
        env,
    )
    assert late.returncode != 0
    assert "prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set" in late.stderr
