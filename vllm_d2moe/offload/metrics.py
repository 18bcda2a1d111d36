"""Offload counters per MoE layer and in total, readable from Python and logged periodically."""

import itertools
import logging
import resource
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, fields

from vllm_d2moe.byte_sizes import format_bytes

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 30.0
_SERIALS = itertools.count()


@dataclass
class LayerCounters:
    calls: int = 0
    hits: int = 0  # (expert, width) demands served by the pool without a read
    misses: int = 0  # reads: a load, an upgrade or (without MWQ reuse) a reload
    bytes_read: int = 0
    io_seconds: float = 0.0  # time the reads took, summed over the I/O threads
    wait_seconds: float = 0.0  # time compute waited for reads (pipeline bubbles)
    bad_sections: int = 0  # expert sections found damaged (each counted once; never read again)
    degraded_pairs: int = 0  # (token, expert) pairs served narrower than asked: a damaged section
    # Cross-layer prefetch (option ``prefetch``), counted on the layer prefetched for:
    prefetch_reads: int = 0  # reads of predicted experts
    bytes_prefetched: int = 0
    bytes_wasted: int = 0  # prefetched, then not used by the call they were read for
    prefetch_hits: int = 0  # experts a call needed that a prefetch had read (or was reading)

    def add(self, other: "LayerCounters") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class ForecastCounters:
    """How forecasts made ``depth`` MoE layers ahead covered what one layer's calls then needed."""

    calls: int = 0
    needed_pairs: int = 0  # (expert, width) pairs the calls computed
    covered_pairs: int = 0  # of them, predicted (the expert at no narrower width)
    predicted_experts: int = 0
    used_experts: int = 0  # of them, needed by the call

    def add(self, other: "ForecastCounters") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def summary(self) -> dict:
        """The counts with recall (covered / needed pairs) and precision (used / predicted experts)."""
        return asdict(self) | {
            "recall": self.covered_pairs / self.needed_pairs if self.needed_pairs else None,
            "precision": self.used_experts / self.predicted_experts if self.predicted_experts else None,
        }


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class OffloadMetrics:
    """Counters of one offload manager; ``pool`` gives the occupancy."""

    def __init__(self, pool):
        self.pool = pool
        self.layers: dict[int, LayerCounters] = defaultdict(LayerCounters)
        self.forecasts: dict[tuple[int, int], ForecastCounters] = defaultdict(ForecastCounters)  # (layer, depth)
        # Which counters these are (one per manager in the process) and how often they restarted:
        # a reader keeping totals across engines and resets (the Prometheus publisher) needs both.
        self.serial = next(_SERIALS)
        self.resets = 0
        self._last_log = time.monotonic()

    def layer(self, layer: int) -> LayerCounters:
        return self.layers[layer]

    def forecast(self, layer: int, depth: int) -> ForecastCounters:
        return self.forecasts[(layer, depth)]

    def snapshot(self) -> dict:
        # One copy of the items (taken without releasing the GIL): other threads (the publisher,
        # a sampler) read while the forward adds a layer's first counters.
        layers = sorted(self.layers.items())
        forecasts = sorted(self.forecasts.items())
        total = LayerCounters()
        for _, counters in layers:
            total.add(counters)
        per_depth: dict[int, ForecastCounters] = defaultdict(ForecastCounters)
        prefetch: dict[int, dict[int, dict]] = defaultdict(dict)
        for (layer, depth), counters in forecasts:
            prefetch[layer][depth] = counters.summary()
            per_depth[depth].add(counters)
        return {
            "layers": {layer: asdict(c) for layer, c in layers},
            "total": asdict(total),
            # Recall and precision per layer predicted for and depth, and per depth over all layers.
            "prefetch": {"layers": dict(prefetch), "depths": {d: c.summary() for d, c in sorted(per_depth.items())}},
            "pool": {
                "budget_bytes": self.pool.budget,
                "allocated_bytes": self.pool.nbytes,
                "slots": self.pool.num_slots,
                "occupied_slots": self.pool.occupied,
                "occupancy_bytes": self.pool.occupancy_nbytes,
            },
            "peak_rss_bytes": peak_rss_bytes(),
            "serial": self.serial,
            "resets": self.resets,
        }

    def reset(self) -> None:
        """Start counting again, in place: a layer call in flight keeps its counters object. (The
        pool's occupancy is state, not a count: it stays.)"""
        self.resets += 1
        for counters in [*self.layers.values(), *self.forecasts.values()]:
            for f in fields(counters):
                setattr(counters, f.name, f.default)

    def maybe_log(self) -> None:
        """Log the totals at most every ``LOG_INTERVAL_S`` seconds (called after each layer call)."""
        now = time.monotonic()
        if now - self._last_log < LOG_INTERVAL_S:
            return
        self._last_log = now
        s = self.snapshot()
        t, pool = s["total"], s["pool"]
        lookups = t["hits"] + t["misses"]
        damage = (f"; {t['bad_sections']} damaged sections, {t['degraded_pairs']} pairs served narrower"
                  if t["bad_sections"] or t["degraded_pairs"] else "")
        if t["prefetch_reads"]:
            recall = ", ".join(f"depth {d} {c['recall']:.0%}" for d, c in s["prefetch"]["depths"].items()
                               if c["recall"] is not None)
            damage += (f"; prefetched {format_bytes(t['bytes_prefetched'])} ({format_bytes(t['bytes_wasted'])} "
                       f"unused), recall {recall}")
        logger.info(
            "d2moe offload: %d layer calls, hit rate %.1f%%, read %s in %.2f s of I/O, compute waited "
            "%.2f s; pool %d/%d slots (%s of %s budget); peak RSS %s%s",
            t["calls"], 100 * t["hits"] / max(lookups, 1), format_bytes(t["bytes_read"]), t["io_seconds"],
            t["wait_seconds"], pool["occupied_slots"], pool["slots"], format_bytes(pool["occupancy_bytes"]),
            format_bytes(pool["budget_bytes"]), format_bytes(s["peak_rss_bytes"]), damage,
        )
