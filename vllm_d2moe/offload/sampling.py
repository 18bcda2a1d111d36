"""Sampling the offload pools and the process memory while an engine serves (tests, benchmarks)."""

import os
import threading

from vllm_d2moe.offload.manager import metrics_snapshots

_PAGE = os.sysconf("SC_PAGE_SIZE")


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class OffloadSampler:
    """``with OffloadSampler() as s: ...`` samples every ``interval_s`` on a background thread;
    ``s.result()`` has the maxima, the sample count and the pools' final metrics."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.samples = 0
        self.max_occupancy_bytes = 0
        self.max_allocated_bytes = 0
        self.budget_bytes = None
        self.max_rss_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="d2moe-offload-sampler", daemon=True)

    def _sample(self) -> None:
        for snapshot in metrics_snapshots():
            pool = snapshot["pool"]
            self.max_occupancy_bytes = max(self.max_occupancy_bytes, pool["occupancy_bytes"])
            self.max_allocated_bytes = max(self.max_allocated_bytes, pool["allocated_bytes"])
            self.budget_bytes = pool["budget_bytes"]
        self.max_rss_bytes = max(self.max_rss_bytes, current_rss_bytes())
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "OffloadSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def result(self) -> dict:
        return {
            "samples": self.samples,
            "max_occupancy_bytes": self.max_occupancy_bytes,
            "max_allocated_bytes": self.max_allocated_bytes,
            "budget_bytes": self.budget_bytes,
            "max_rss_bytes": self.max_rss_bytes,
            "metrics": metrics_snapshots(),
        }
