"""The offload pipeline's I/O threads, taking reads in priority order rather than first come first
served: a layer's demand reads (priority 0) start before any queued prefetch, whenever those were
queued; prefetches run nearest layer first, then hottest expert and lowest width first."""

import heapq
import itertools
import os
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future

DEMAND = (0,)


def set_failed(future: Future, error: BaseException) -> None:
    """Fail ``future`` with ``error``, the finished frames of its traceback, and of those of the
    errors it was raised from or while handling, cleared of their locals (they still print). The
    future outlives the call, and a frame that holds it (a read's ``load``) would otherwise close a
    reference cycle that frees the frames, and what they hold, only when the cyclic GC runs."""
    chained, seen = error, set()
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        traceback.clear_frames(chained.__traceback__)
        chained = chained.__cause__ or chained.__context__
    future.set_exception(error)


def process_cpus() -> set[int] | None:
    """The CPUs some thread of this process may run on (None where the OS does not say). vLLM's CPU
    worker pins each OpenMP thread to one CPU, the thread that loads the model included, and a thread
    inherits the CPUs of the thread that starts it: I/O threads started there would share that one
    core with a compute thread and never run on the others (benchmarks/results/streamed_pipeline.md)."""
    if not hasattr(os, "sched_getaffinity") or not os.path.isdir("/proc/self/task"):
        return None
    cpus = set()
    for task in os.listdir("/proc/self/task"):
        try:
            cpus |= os.sched_getaffinity(int(task))
        except OSError:  # the thread has ended
            pass
    return cpus or None


class PriorityExecutor:
    """``threads`` daemon threads running submitted calls lowest ``priority`` first (ties in
    submission order); a queued call's future can be cancelled until a thread takes it. The threads
    may run on every CPU of the process (:func:`process_cpus`), whichever thread starts them."""

    def __init__(self, threads: int, name: str):
        self._heap: list = []
        self._ready = threading.Condition()
        self._order = itertools.count()
        self._closed = False
        cpus = process_cpus()
        for i in range(threads):
            threading.Thread(target=self._work, args=(cpus,), name=f"{name}_{i}", daemon=True).start()

    def submit(self, priority: tuple, fn: Callable, *args) -> Future:
        future = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("d2moe offload I/O threads are shut down")
            heapq.heappush(self._heap, (priority, next(self._order), future, fn, args))
            self._ready.notify()
        return future

    def _work(self, cpus: set[int] | None) -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)  # this thread's
        while True:
            with self._ready:
                while not self._heap and not self._closed:
                    self._ready.wait()
                if not self._heap:
                    return
                _, _, future, fn, args = heapq.heappop(self._heap)
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 (raised where the future is read)
                set_failed(future, e)
            else:
                future.set_result(result)

    def shutdown(self) -> None:
        """Cancel every queued call and let the threads end once their current one is done."""
        with self._ready:
            self._closed = True
            for _, _, future, _, _ in self._heap:
                future.cancel()
            self._heap.clear()
            self._ready.notify_all()
