"""Offload counters and width statistics out of the process that serves the model.

Under vLLM's default process layout the experts run in the engine-core process
(or in its workers), so :func:`vllm_d2moe.offload.metrics_snapshots` and
``WIDTH_STATS`` read in the user's process see nothing. Two ways out:

* **Prometheus** (``/metrics`` of the OpenAI server). A thread in every process
  that serves d2moe layers copies the counters every ``PUBLISH_INTERVAL_S`` into
  ``prometheus_client`` metrics. ``d2moe serve`` sets ``PROMETHEUS_MULTIPROC_DIR``
  before vLLM starts (:func:`use_multiprocess_prometheus`), so those metrics are
  written to files the API server's ``/metrics`` reads beside vLLM's own: the
  setting vLLM itself uses with ``--api-server-count`` > 1, whose registry
  (``vllm.v1.metrics.prometheus.get_prometheus_registry``) is a
  ``MultiProcessCollector`` over that directory. This was chosen over vLLM's
  stats path (``SchedulerStats`` sent from the engine core with every output):
  that path has fixed fields, and carrying ours would mean patching the
  scheduler, the output processor and the stat loggers; the files need no patch.
  Without the variable (an engine in the user's own process) the metrics go to
  ``prometheus_client``'s default registry, which is what that process exports.
* **Offline** ``LLM`` users: :func:`engine_stats` (``vllm_d2moe.engine_stats(llm)``)
  asks every worker through ``llm.collective_rpc`` for its snapshots; it works
  with the engine in the user's process as well as spawned (then the workers are
  vLLM's ``mp`` executor's processes on CPU).

``/metrics`` lags the counts by up to ``PUBLISH_INTERVAL_S``. Counters keep growing
across resets (``engine_stats(llm, reset=True)``) and across engines started one
after another in one process.

Series (counters are summed over processes; under tensor parallelism each rank
reads its own slice of an expert, so reads and bytes count per rank, while the
width choices, identical on every rank, are published by tensor-parallel rank 0):

* ``d2moe_expert_reads_total{layer}``, ``d2moe_expert_hits_total{layer}``,
  ``d2moe_bytes_read_total{layer}``, ``d2moe_read_wait_seconds_total{layer}``
  (time compute waited for reads);
* ``d2moe_bad_sections_total{layer}`` (expert sections found damaged, each once) and
  ``d2moe_degraded_pairs_total{layer}`` ((token, expert) pairs served narrower than asked
  because of one; option ``on_read_error``);
* with option ``prefetch``, per layer predicted for: ``d2moe_prefetch_reads_total``,
  ``d2moe_bytes_prefetched_total``, ``d2moe_bytes_prefetched_unused_total`` (read, then not
  used by the call they were read for), ``d2moe_prefetch_hits_total``; per layer and
  ``depth``: ``d2moe_prefetch_{needed,covered}_pairs_total`` (recall: covered / needed) and
  ``d2moe_prefetch_{predicted,used}_experts_total`` (precision: used / predicted);
* ``d2moe_pool_bytes{kind="budget"|"allocated"|"occupied"}``;
* ``d2moe_width_pairs_total{layer, bits}`` ((token, expert) pairs served at that width);
* ``d2moe_average_bits`` (mean width of every pair counted by this process's layers;
  the exact average over several processes is
  ``sum(bits * rate(d2moe_width_pairs_total))`` over ``sum(rate(...))``);
* with ``target_bits`` or ``slo`` (the online width controller, :mod:`vllm_d2moe.router.controller`):
  ``d2moe_width_shift`` (the router's current global shift), ``d2moe_width_setpoint_bits``
  (the average width it steers to), ``d2moe_controlled_average_bits`` (running average width of
  the pairs it steers), ``d2moe_p90_step_ms`` and ``d2moe_slo_attainment`` (share of
  steps within ``tpot_ms``).
"""

import os
import sys
import tempfile
import threading
import time

PUBLISH_INTERVAL_S = 1.0
MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
WORKER_STATS_METHOD = "d2moe_stats"  # what workers answer with process_stats (patches.py)

# Offload counter field -> Prometheus counter name (without "_total") and help text.
_OFFLOAD_COUNTERS = {
    "misses": ("d2moe_expert_reads", "Expert reads from disk (loads, width upgrades, reloads), per MoE layer"),
    "hits": ("d2moe_expert_hits", "(expert, width) demands served by the resident pool without a read"),
    "bytes_read": ("d2moe_bytes_read", "Bytes of expert weights read from disk"),
    "wait_seconds": ("d2moe_read_wait_seconds", "Seconds compute waited for expert reads"),
    "bad_sections": ("d2moe_bad_sections", "Expert sections found damaged (checksum or truncation), each once"),
    "degraded_pairs": ("d2moe_degraded_pairs", "(token, expert) pairs served narrower than asked: a damaged section"),
    "prefetch_reads": ("d2moe_prefetch_reads", "Expert reads for a forecast (option prefetch), per layer read for"),
    "bytes_prefetched": ("d2moe_bytes_prefetched", "Bytes of expert weights read for a forecast"),
    "bytes_wasted": ("d2moe_bytes_prefetched_unused", "Prefetched bytes the call they were read for did not use"),
    "prefetch_hits": ("d2moe_prefetch_hits", "Experts a layer call needed that a prefetch had read"),
}
# Forecast counter field (per layer predicted for and depth) -> Prometheus counter name and help text.
_FORECAST_COUNTERS = {
    "needed_pairs": ("d2moe_prefetch_needed_pairs", "(expert, width) pairs layer calls computed, per forecast depth"),
    "covered_pairs": ("d2moe_prefetch_covered_pairs", "Of them, forecast (recall = covered / needed)"),
    "predicted_experts": ("d2moe_prefetch_predicted_experts", "Experts forecast for a layer call"),
    "used_experts": ("d2moe_prefetch_used_experts", "Of them, used (precision = used / predicted)"),
}
# Online width controller snapshot key -> gauge name and help text.
_CONTROLLER_GAUGES = {
    "shift": ("d2moe_width_shift", "The router's global score shift the online width controller set"),
    "setpoint_bits": ("d2moe_width_setpoint_bits", "Average width the online width controller steers to"),
    "average_bits": ("d2moe_controlled_average_bits", "Running average width of the pairs the controller steers"),
    "p90_step_ms": ("d2moe_p90_step_ms", "p90 step time (ms) of the last seconds, as the width controller sees it"),
    "slo_attainment": ("d2moe_slo_attainment", "Share of steps within the slo's tpot_ms"),
}
_POOL_GAUGES = {"budget": "budget_bytes", "allocated": "allocated_bytes", "occupied": "occupancy_bytes"}

_multiproc_dir: tempfile.TemporaryDirectory | None = None


def use_multiprocess_prometheus() -> str:
    """Make this process and those it starts write Prometheus metrics to a shared directory
    (``PROMETHEUS_MULTIPROC_DIR``; a fresh temporary one unless the user set it), so that an API
    server in this process exports the metrics of an engine core it spawns. Call before vLLM (or
    anything else) imports ``prometheus_client``: the client picks its storage at import."""
    global _multiproc_dir
    if MULTIPROC_DIR_VARIABLE in os.environ:
        return os.environ[MULTIPROC_DIR_VARIABLE]
    if "prometheus_client" in sys.modules:
        raise RuntimeError(
            f"prometheus_client was imported before {MULTIPROC_DIR_VARIABLE} was set, so this process "
            "would keep its metrics in memory, where /metrics (reading the directory) no longer looks"
        )
    _multiproc_dir = tempfile.TemporaryDirectory(prefix="d2moe-prometheus-")
    os.environ[MULTIPROC_DIR_VARIABLE] = _multiproc_dir.name
    return _multiproc_dir.name


def process_stats(reset: bool = False) -> dict:
    """This process's offload snapshots (one per live offload manager) and width statistics;
    ``reset`` then clears both (vLLM's warm-up and profiling passes count too)."""
    from vllm_d2moe.offload.manager import metrics_snapshots, reset_metrics
    from vllm_d2moe.vllm_glue.width_control import active_controller
    from vllm_d2moe.width_selection import WIDTH_STATS

    controller = active_controller()
    stats = {
        "pid": os.getpid(),
        "offload": metrics_snapshots(),
        "widths": {
            "average_bits": WIDTH_STATS.average_bits(),
            "per_layer": WIDTH_STATS.snapshot(),
            "capacity_excess": WIDTH_STATS.capacity_excess(),
        },
        "controller": None if controller is None else controller.snapshot(),
    }
    if reset:
        if _publisher is not None:
            _publisher.publish()  # what was counted reaches Prometheus before the counts restart
        reset_metrics()
        WIDTH_STATS.reset()
        if controller is not None:
            controller.reset_counts()
    return stats


def engine_stats(llm, reset: bool = False) -> list[dict]:
    """Offload snapshots and width statistics of every worker of ``llm`` (a ``vllm.LLM``), one dict
    per worker as :func:`process_stats` gives them; ``reset`` clears them after reading.

    Asked through ``llm.collective_rpc(WORKER_STATS_METHOD)``, a name every worker answers once
    the plugin is registered there (``patches.py``): vLLM sends a callable to a spawned engine core
    only with ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``. The replies are plain dicts (msgpack).
    """
    collective_rpc = getattr(llm, "collective_rpc", None)
    if collective_rpc is None:
        raise TypeError(f"engine_stats needs a vllm.LLM (with collective_rpc), got {type(llm).__name__}")
    return collective_rpc(WORKER_STATS_METHOD, kwargs={"reset": reset})


class PrometheusPublisher:
    """Copies this process's counters into ``prometheus_client`` metrics (see the module docstring).

    Counters only go up in Prometheus; the sources may restart (an engine shut down and another
    started in the same process, or a reset): a value below the last one published counts whole.
    """

    def __init__(self, publish_widths: bool, registry=None):
        """``registry``: prometheus_client's default one unless given."""
        from prometheus_client import REGISTRY, Counter, Gauge

        registry = REGISTRY if registry is None else registry
        self.publish_widths = publish_widths
        self._offload = {
            field: Counter(name, help_text, ["layer"], registry=registry)
            for field, (name, help_text) in _OFFLOAD_COUNTERS.items()
        }
        self._forecast = {
            field: Counter(name, help_text, ["layer", "depth"], registry=registry)
            for field, (name, help_text) in _FORECAST_COUNTERS.items()
        }
        self._pool = Gauge("d2moe_pool_bytes", "Expert pool bytes: the budget, allocated, occupied by experts",
                           ["kind"], multiprocess_mode="livesum", registry=registry)
        self._pairs = Counter("d2moe_width_pairs", "(token, expert) pairs served at each bit-width",
                              ["layer", "bits"], registry=registry)
        self._average = Gauge("d2moe_average_bits", "Mean bit-width of the pairs counted so far",
                              multiprocess_mode="livemostrecent", registry=registry)
        self._controller = {
            key: Gauge(name, help_text, multiprocess_mode="livemostrecent", registry=registry)
            for key, (name, help_text) in _CONTROLLER_GAUGES.items()
        }
        self._published: dict[tuple, tuple[int, float]] = {}  # (resets, value) last published
        self._pool_published = False
        self._lock = threading.Lock()  # the thread's publishes and process_stats' final one

    def _advance(self, counter, labels: tuple, source, resets: int, value: float) -> None:
        """Add to ``counter{labels}`` what ``source`` (one set of counts, reset ``resets`` times so
        far) counted since the last publish."""
        key = (counter, labels, source)
        last_resets, last = self._published.get(key, (resets, 0))
        if resets != last_resets:
            last = 0
        child = counter.labels(*labels)  # made at the first publish: a zero count is a series too
        if value > last:
            child.inc(value - last)
        self._published[key] = (resets, value)

    def publish(self) -> None:
        from vllm_d2moe.offload.manager import metrics_snapshots
        from vllm_d2moe.width_selection import WIDTH_STATS

        with self._lock:
            snapshots = metrics_snapshots()
            for snapshot in snapshots:  # one per offload manager (engine) alive in this process
                source = ("offload", snapshot["serial"])
                for layer, counters in snapshot["layers"].items():
                    for field, counter in self._offload.items():
                        self._advance(counter, (str(layer),), source, snapshot["resets"], counters[field])
                for layer, depths in snapshot["prefetch"]["layers"].items():
                    for depth, counters in depths.items():
                        for field, counter in self._forecast.items():
                            self._advance(counter, (str(layer), str(depth)), source, snapshot["resets"],
                                          counters[field])
            if snapshots or self._pool_published:  # 0 once the engine that had a pool is gone
                for kind, key in _POOL_GAUGES.items():
                    self._pool.labels(kind).set(sum(s["pool"][key] for s in snapshots))
                self._pool_published = True
            if self.publish_widths:
                resets, histograms = WIDTH_STATS.counted_since_reset()
                for layer, histogram in histograms.items():
                    for bits, pairs in histogram.items():
                        self._advance(self._pairs, (str(layer), str(bits)), "widths", resets, pairs)
                average = WIDTH_STATS.average_bits()
                if average is not None:
                    self._average.set(average)
                self._publish_controller()

    def _publish_controller(self) -> None:
        from vllm_d2moe.vllm_glue.width_control import active_controller

        controller = active_controller()
        if controller is not None:
            snapshot = controller.snapshot()
            for key, gauge in self._controller.items():
                if snapshot[key] is not None:
                    gauge.set(snapshot[key])


_start_lock = threading.Lock()
_publisher: PrometheusPublisher | None = None


def start_publishing(publish_widths: bool) -> PrometheusPublisher:
    """Start this process's publisher thread (once per process; a later call with
    ``publish_widths`` turns the width series on)."""
    global _publisher
    with _start_lock:
        if _publisher is None:
            _publisher = PrometheusPublisher(publish_widths)
            threading.Thread(target=_publish_forever, args=(_publisher,), name="d2moe-prometheus",
                             daemon=True).start()
        _publisher.publish_widths |= publish_widths
        return _publisher


def _publish_forever(publisher: PrometheusPublisher) -> None:
    import logging

    while True:
        time.sleep(PUBLISH_INTERVAL_S)
        try:
            publisher.publish()
        except Exception:  # metrics must never stop serving: logged, then tried again
            logging.getLogger(__name__).exception("d2moe: publishing Prometheus metrics failed")
