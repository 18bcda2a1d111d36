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

    def add(self, other: "LayerCounters") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class OffloadMetrics:
    """Counters of one offload manager; ``pool`` gives the occupancy."""

    def __init__(self, pool):
        self.pool = pool
        self.layers: dict[int, LayerCounters] = defaultdict(LayerCounters)
        # Which counters these are (one per manager in the process) and how often they restarted:
        # a reader keeping totals across engines and resets (the Prometheus publisher) needs both.
        self.serial = next(_SERIALS)
        self.resets = 0
        self._last_log = time.monotonic()

    def layer(self, layer: int) -> LayerCounters:
        return self.layers[layer]

    def snapshot(self) -> dict:
        # One copy of the items (taken without releasing the GIL): other threads (the publisher,
        # a sampler) read while the forward adds a layer's first counters.
        layers = sorted(self.layers.items())
        total = LayerCounters()
        for _, counters in layers:
            total.add(counters)
        return {
            "layers": {layer: asdict(c) for layer, c in layers},
            "total": asdict(total),
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
        for counters in list(self.layers.values()):
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
        logger.info(
            "d2moe offload: %d layer calls, hit rate %.1f%%, read %s in %.2f s of I/O, compute waited "
            "%.2f s; pool %d/%d slots (%s of %s budget); peak RSS %s%s",
            t["calls"], 100 * t["hits"] / max(lookups, 1), format_bytes(t["bytes_read"]), t["io_seconds"],
            t["wait_seconds"], pool["occupied_slots"], pool["slots"], format_bytes(pool["occupancy_bytes"]),
            format_bytes(pool["budget_bytes"]), format_bytes(s["peak_rss_bytes"]), damage,
        )
