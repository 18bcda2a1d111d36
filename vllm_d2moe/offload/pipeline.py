"""HEBF-ordered expert loading overlapped with compute, for one MoE layer call at a time.

A layer call needs a set of (expert, width) segments. Loads are planned
hottest-expert-bit-first: experts with the most routed tokens first and,
within an expert, lower widths before their upgrades (a lower width is a
prefix that the wider one reuses, and its tokens can start computing
earlier). Loads go to background I/O threads (``os.pread`` releases the GIL)
as pool slots allow, which also write a new expert into its slot in the
kernels' layout, while the compute thread runs, in arrival order, every
segment whose expert has arrived at a sufficient width; it blocks (a bubble)
only when nothing computable is left. Slots of experts the call still needs
are pinned; a pool smaller than the call's working set is streamed through
as computed experts unpin their slots. A read that fails for good (a corrupt or
truncated blob, an I/O error after the store's retries) fails only the segments
of that expert it was needed for; the call computes the rest and reports it.
Under ``on_read_error="degrade"`` (the default) segments whose width needs a
damaged section are computed instead at the widest width whose sections are
intact (logged once per expert, counted per pair); only a damaged base, or a
disk error, fails them. A slot is released only once no I/O thread reads or
writes for it any more, whatever made the call fail.

Cross-layer prefetch (option ``prefetch``): a layer call may bring forecasts
of what the next MoE layers will need (``vllm_glue`` runs the predictor of
``vllm_d2moe.prefetch`` on the layer's input). Their reads go to the same I/O
threads, behind the call's demand reads (:mod:`~vllm_d2moe.offload.io_queue`:
any demand read starts before any queued prefetch), nearest layer first, then
hottest expert and lowest width first, into slots that are free or hold
experts nothing protects: a prefetch never evicts what the call uses, another
forecast expert or another prefetch, nor an expert routed more often than
the forecast expects of the one it brings, and never exceeds the pool. A prefetched
slot is evictable once written; a demand that finds every slot pinned cancels
queued prefetches for their slots; a layer call adopts a prefetch of an expert
it needs that is still reading, and cancels queued ones it does not need. A
prefetch that turns out unused costs its bytes (``bytes_wasted``).

:class:`OffloadPolicy` switches each step off for the benchmark's ablations:
expert-id order instead of HEBF, reads on the compute thread instead of
overlapped, full re-reads instead of MWQ upgrades, and nothing kept across
calls instead of the frequency-kept pool.
"""

import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, fields

from vllm_d2moe.mwq.checkpoint import CheckpointError, CorruptSectionsError
from vllm_d2moe.offload.io_queue import DEMAND, PriorityExecutor, set_failed
from vllm_d2moe.offload.metrics import LayerCounters, OffloadMetrics
from vllm_d2moe.offload.pool import Key, ResidentPool
from vllm_d2moe.offload.store import ExpertStore, SectionBytes

logger = logging.getLogger(__name__)

READ_ERROR_MODES = ("fail", "degrade")
# Forecasts of one layer call: (later MoE layer, depth, {expert: (predicted tokens, widest predicted width)}).
Forecasts = list[tuple[int, int, dict[int, tuple[int, int]]]]

@dataclass(frozen=True)
class OffloadPolicy:
    order: str = "hebf"  # or "id": experts in id order
    overlap: bool = True  # reads on background threads while computing
    reuse: bool = True  # an upgrade reads only the planes above the resident width
    keep: bool = True  # keep experts across calls, evicting the least frequent
    io_threads: int = 2
    direct: bool = False  # O_DIRECT reads (bypass the page cache)
    # A damaged section: serve the widest intact width ("degrade") or fail the pairs ("fail").
    on_read_error: str = "degrade"

    @classmethod
    def from_option(cls, option: dict | None, on_read_error: str | None = None) -> "OffloadPolicy":
        """From the ``offload`` option of ``quantization_config`` (a dict of these fields but
        ``on_read_error``, an option of its own)."""
        option = option or {}
        known = {f.name for f in fields(cls)} - {"on_read_error"}
        if not isinstance(option, dict) or set(option) - known:
            raise ValueError(
                f"d2moe option 'offload' must be a dict with keys among {sorted(known)}, got {option!r}"
            )
        if on_read_error is not None and on_read_error not in READ_ERROR_MODES:
            raise ValueError(f"d2moe option 'on_read_error' must be 'fail' or 'degrade', got {on_read_error!r}")
        policy = cls(**option, **({"on_read_error": on_read_error} if on_read_error is not None else {}))
        if policy.order not in ("hebf", "id"):
            raise ValueError(f"d2moe option offload.order must be 'hebf' or 'id', got {policy.order!r}")
        if not isinstance(policy.io_threads, int) or policy.io_threads < 1:
            raise ValueError(f"d2moe option offload.io_threads must be a positive integer, got {policy.io_threads!r}")
        return policy


@dataclass
class _Load:
    key: Key
    first: int  # sections first .. last of the expert's blob
    last: int
    write_ahead: bool  # into a slot reserved for it, on the I/O thread: no call reads the slot yet
    future: Future | None = None
    prefetch: bool = False  # read for a forecast, not (yet) for a call's demand


class LoadPipeline:
    def __init__(self, store: ExpertStore, pool: ResidentPool, policy: OffloadPolicy, metrics: OffloadMetrics):
        self.store, self.pool, self.policy, self.metrics = store, pool, policy, metrics
        self.executor = PriorityExecutor(policy.io_threads, "d2moe-io") if policy.overlap else None
        # Reads in flight at once: enough to keep every thread busy while the compute thread runs
        # a batch of segments (one more read per thread behind the one it reads). Not more: a read
        # takes its slot when queued, and slots taken later in a call can be the call's finished
        # experts instead of the next layer's (benchmarks/results/streamed_pipeline.md).
        self.max_in_flight = 2 * policy.io_threads + 1 if policy.overlap else 1
        self._degraded_to: dict[Key, int] = {}  # width a degraded expert was last logged at
        self.calls = 0  # layer calls so far: a prefetch's priority is the call it is predicted for
        self._prefetches: dict[Key, _Load] = {}  # queued or reading, not yet installed or adopted
        self._unused: dict[Key, int] = {}  # prefetched and installed, not yet needed: bytes read
        self._adopted: dict[Key, _Load] = {}  # prefetches still reading that this call needs
        self._forecasts: dict[int, dict[int, dict[int, int]]] = {}  # later layer -> depth -> {expert: width}
        pool.on_evict = self._evicted

    def run(
        self,
        layer: int,
        experts: list[int],
        widths: list[int],
        rows: list[int],
        compute: Callable[[list[tuple[int, int, int]]], None],
        forecasts: Forecasts = (),
    ) -> dict[int, CheckpointError]:
        """Compute segments ``i`` (expert ``experts[i]`` at ``widths[i]`` over ``rows[i]`` pairs,
        sorted by expert then width) once each the expert is resident, by calls
        ``compute([(i, slot, width), ...])`` of every segment ready at that moment (one kernel call
        for many experts: one per expert cost several times the work at one token); ``width`` is
        ``widths[i]``, or narrower where ``on_read_error="degrade"`` serves a damaged expert at its
        widest intact width. Follows :meth:`resident_slots` of the same call; ``forecasts`` are
        prefetched behind this call's reads.

        Returns the segments left uncomputed because their expert could not be read, with the
        read's error."""
        counters = self.metrics.layer(layer)
        counters.calls += 1
        widths = [self._servable(layer, e, w, n, counters) for e, w, n in zip(experts, widths, rows)]
        segments: dict[Key, deque[int]] = defaultdict(deque)
        tokens: dict[Key, int] = defaultdict(int)
        for i, (expert, n) in enumerate(zip(experts, rows)):
            segments[(layer, expert)].append(i)
            tokens[(layer, expert)] += n
        self.pool.touch(tokens)
        hottest_first = self.policy.order == "hebf"
        order = sorted(segments, key=lambda k: (-tokens[k], k[1]) if hottest_first else k[1])
        segments = {key: segments[key] for key in order}
        queue, chains, adopted = deque(), {}, 0
        for key in order:
            early = self._adopted.pop(key, None)  # a prefetch of it, still reading: the chain's first read
            have = early.last + self.pool.min_bits if early else None
            chains[key] = self._plan(key, [widths[i] for i in segments[key]], counters, have)
            queue.extend(chains[key])
            if early:
                chains[key].appendleft(early)
                adopted += 1
        self._adopted.clear()
        for key in order:
            if key in self.pool.slot_of:
                self.pool.pin(key)
        try:
            failed = self._execute(queue, chains, segments, widths, rows, compute, counters, adopted,
                                   lambda: self._queue_prefetches(forecasts, set(order)))
        except BaseException:
            self._settle(load for chain in chains.values() for load in chain)
            for key in order:
                if key in self.pool.slot_of and self.pool.width(key) == 0:
                    self.pool.release(key)  # a reserved slot whose load failed
                elif key in self.pool.slot_of:
                    self.pool.unpin(key)
            raise
        if not self.policy.keep:
            for key in order:
                self.pool.release(key)
        self.metrics.maybe_log()
        return failed

    def _servable(self, layer: int, expert: int, width: int, pairs: int, counters: LayerCounters) -> int:
        """``width``, or under ``on_read_error="degrade"`` the expert's widest intact width when a
        damaged section makes that narrower (its ``pairs`` counted); a damaged base serves nothing
        and the read fails."""
        intact = self.store.intact_width(layer, expert) if self.policy.on_read_error == "degrade" else None
        if intact is None or not self.pool.min_bits <= intact < width:
            return width
        counters.degraded_pairs += pairs
        return intact

    def resident_slots(self, layer: int, pairs: list[tuple[int, int]], tokens: dict[int, int],
                       forecasts: Forecasts = ()) -> dict[int, int] | None:
        """Start a layer call (every call starts here): finished prefetches are installed, this
        layer's forecasts scored against ``pairs``, its prefetches still queued and not needed
        cancelled. Then the fast path of a call that reads nothing: when every ``(expert, width)``
        of ``pairs`` is served by the pool, count the call (``tokens`` routed per expert), queue
        ``forecasts`` and return each expert's slot; else ``None`` and the call goes through
        :meth:`run` (which queues them)."""
        self.calls += 1
        self.pool.calling(layer)
        self._begin(layer, pairs)

        def served(expert: int, width: int) -> bool:
            have = self.pool.width((layer, expert))
            return have >= width if self.policy.reuse else have == width

        if self._adopted or not all(served(e, w) for e, w in pairs):
            return None
        counters = self.metrics.layer(layer)
        counters.calls += 1
        counters.hits += len(pairs)
        self.pool.touch({(layer, e): n for e, n in tokens.items()})
        self._queue_prefetches(forecasts, {(layer, e) for e, _ in pairs})
        self.metrics.maybe_log()
        return {e: self.pool.slot_of[(layer, e)] for e, _ in pairs}

    # ------------------------------------------------------------------ prefetch

    def _begin(self, layer: int, pairs: list[tuple[int, int]]) -> None:
        self._prefetches.update(self._adopted)  # a call that failed before running: not adopted after all
        self._adopted.clear()
        self._reap()
        needed: dict[int, int] = {}
        for expert, width in pairs:
            needed[expert] = max(width, needed.get(expert, 0))
        counters = self.metrics.layer(layer)
        for depth, predicted in self._forecasts.pop(layer, {}).items():
            scored = self.metrics.forecast(layer, depth)
            scored.calls += 1
            scored.needed_pairs += len(pairs)
            scored.covered_pairs += sum(predicted.get(e, 0) >= w for e, w in pairs)
            scored.predicted_experts += len(predicted)
            scored.used_experts += sum(e in needed for e in predicted)
        for key in [k for k in self._unused if k[0] == layer]:
            nbytes = self._unused.pop(key)
            if key[1] in needed:
                counters.prefetch_hits += 1
            else:
                counters.bytes_wasted += nbytes
        for key in [k for k in self._prefetches if k[0] == layer]:
            load = self._prefetches[key]
            if key[1] in needed and not load.future.cancel():
                # Still reading: the call's chain starts with it, if it still applies to the slot.
                del self._prefetches[key]
                if load.write_ahead or self.pool.width(key) == load.first - 1 + self.pool.min_bits:
                    counters.prefetch_hits += 1
                    self._adopted[key] = load
                else:
                    self._settle([load])
                    self._drop_prefetch(load, counters)
            elif load.future.cancel():  # not started: cancelled, costs nothing
                del self._prefetches[key]
                if load.write_ahead:
                    self.pool.release(key)

    def _queue_prefetches(self, forecasts: Forecasts, protect: set[Key]) -> None:
        """Queue reads of the forecast experts that the pool does not serve, in one global order
        (nearest layer, hottest expert, lowest width first), into slots nothing in use or
        predicted holds and no expert routed more often than the forecast expects of this one, and
        no more slots than the call (``protect``) leaves (a call streaming through the pool needs
        them)."""
        if not forecasts or self.executor is None:
            return
        wanted = []
        for later, depth, experts in forecasts:
            self._forecasts.setdefault(later, {})[depth] = {e: w for e, (_, w) in experts.items()}
            wanted += [(depth, -tokens, width, expert, later) for expert, (tokens, width) in experts.items()]
        wanted.sort()
        keep = protect | {(later, e) for *_, e, later in wanted} | set(self._unused) | set(self._prefetches)
        min_bits = self.pool.min_bits
        room = self.pool.num_slots - len(protect) - sum(p.write_ahead for p in self._prefetches.values())
        full: set[int] = set()  # depths whose next prediction found no slot
        for rank, (depth, hotness, width, expert, later) in enumerate(wanted):
            key = (later, expert)
            have = self.pool.width(key)
            if key in self._prefetches or have >= width or (key in self.pool.slot_of and not have):
                continue  # queued already, served, or reserved for a read
            if have:
                if not self.policy.reuse:
                    continue
                load = _Load(key, have - min_bits + 1, width - min_bits, write_ahead=False, prefetch=True)
            else:
                # Never in place of an expert as hot as this one is expected to be (nor, then, of one
                # for a colder prediction of the same depth).
                if room <= 0 or depth in full or self.pool.acquire(key, keep, colder_than=-hotness) is None:
                    full.add(depth)
                    continue
                room -= 1
                self.pool.pin(key)  # until written: no eviction while an I/O thread writes the slot
                load = _Load(key, 0, width - min_bits, write_ahead=True, prefetch=True)
            load.future = self.executor.submit((1, self.calls + depth, rank), self._fetch, load,
                                               self.pool.slot_of[key])
            self._prefetches[key] = load

    def _reap(self) -> None:
        """Install the prefetches that finished reading (on the compute thread, between layer calls
        or while one waits); a failed one is dropped (a call that needs the expert reads it again and
        reports the error)."""
        for key, load in list(self._prefetches.items()):
            if not load.future.done():
                continue
            del self._prefetches[key]
            counters = self.metrics.layer(key[0])
            if load.future.cancelled() or load.future.exception() is not None:
                if load.write_ahead:
                    self.pool.release(key)
                continue
            if not load.write_ahead and self.pool.width(key) != load.first - 1 + self.pool.min_bits:
                self._drop_prefetch(load, counters)  # an upgrade of an evicted expert
                continue
            self._install(load, counters)
            if load.write_ahead:
                self.pool.unpin(key)
            self._unused[key] = self._unused.get(key, 0) + self._prefetched_nbytes(load)

    def _reclaim_slot(self) -> bool:
        """Cancel the last queued prefetch into a reserved slot and free the slot (for a demand read
        that found every slot pinned)."""
        for key, load in reversed(self._prefetches.items()):
            if load.write_ahead and load.future.cancel():
                del self._prefetches[key]
                self.pool.release(key)
                return True
        return False

    def _evicted(self, key: Key) -> None:
        nbytes = self._unused.pop(key, None)
        if nbytes is not None:
            self.metrics.layer(key[0]).bytes_wasted += nbytes

    def _drop_prefetch(self, load: _Load, counters: LayerCounters) -> None:
        """A finished prefetch that is not installed: its read counts as prefetched, and as wasted."""
        nbytes = self._prefetched_nbytes(load)
        if nbytes:
            counters.prefetch_reads += 1
            counters.bytes_prefetched += nbytes
            counters.io_seconds += load.future.result()[2]
        counters.bytes_wasted += nbytes

    @staticmethod
    def _prefetched_nbytes(load: _Load) -> int:
        """Bytes a finished prefetch read (0: it failed)."""
        return 0 if load.future.exception() is not None else load.future.result()[1]

    # ------------------------------------------------------------------ demand

    def _plan(self, key: Key, widths: list[int], counters: LayerCounters, have: int | None = None) -> deque[_Load]:
        """The reads that bring ``key`` to each needed width, lowest first, from its resident width
        or ``have``."""
        min_bits = self.pool.min_bits
        have, loads = self.pool.width(key) if have is None else have, deque()
        for width in sorted(set(widths)):
            if (width <= have) if self.policy.reuse else (width == have):
                counters.hits += 1
                continue
            first = have - min_bits + 1 if self.policy.reuse and have else 0
            loads.append(_Load(key, first, width - min_bits, write_ahead=have == 0))
            have = width
        counters.misses += len(loads)
        return loads

    def _execute(self, queue, chains, segments, widths, rows, compute, counters, in_flight, prefetch
                 ) -> dict[int, CheckpointError]:
        """The call's loop; ``prefetch()`` queues the forecasts once the first demand reads are
        submitted (an idle I/O thread would otherwise start a prefetch first)."""
        ready: list[tuple[int, int, int]] = []  # (segment, slot, width) to compute at the next flush
        finished: list[Key] = []  # experts whose last segment is in `ready`: unpinned after the flush

        def compute_ready(key: Key) -> bool:
            """Queue ``key``'s segments its resident width serves (with MWQ reuse: any width up to
            it; without: exactly it) for the next :func:`flush`."""
            have, pending = self.pool.width(key), segments.get(key)
            served = (lambda w: w <= have) if self.policy.reuse else (lambda w: w == have)
            ran = False
            while pending and have and served(widths[pending[0]]):
                i = pending.popleft()
                ready.append((i, self.pool.slot_of[key], widths[i]))
                ran = True
            if pending is not None and not pending:
                del segments[key]
                finished.append(key)
            return ran

        def flush() -> None:
            """Compute the queued segments in one call, then unpin the experts they finished (no
            slot is acquired, so none evicted, between queueing and computing)."""
            if ready:
                compute(ready)
                ready.clear()
            for key in finished:
                self.pool.unpin(key)
            finished.clear()

        def drop_loads(key: Key) -> None:
            """Forget ``key``'s remaining loads; those in flight are cancelled or waited for."""
            nonlocal in_flight
            loads = chains.pop(key)
            for load in loads:
                if load.future is None:
                    queue.remove(load)
                else:
                    in_flight -= 1
            self._settle(loads)

        def degrade(key: Key, error: CorruptSectionsError) -> bool:
            """Under ``on_read_error="degrade"``, serve ``key``'s pending segments at its widest intact
            width, re-planning its loads; False where no width of it is intact."""
            intact = self.store.intact_width(*key)
            if self.policy.on_read_error != "degrade" or intact < self.pool.min_bits or key not in segments:
                return False
            for i in segments[key]:
                if widths[i] > intact:
                    widths[i] = intact
                    counters.degraded_pairs += rows[i]
            drop_loads(key)
            # Counted as reads; their hits were counted when the call was planned.
            chains[key] = self._plan(key, [widths[i] for i in segments[key]], LayerCounters())
            counters.misses += len(chains[key])
            queue.extendleft(reversed(chains[key]))
            if self._degraded_to.get(key) != intact:
                self._degraded_to[key] = intact
                logger.warning("d2moe: MoE layer %d expert %d is served at up to %d bits from now on "
                               "(on_read_error=degrade): %s", *key, intact, error)
            compute_ready(key)
            return True

        def give_up(key: Key, error: CheckpointError) -> None:
            """``key`` cannot reach the widths still pending: fail those segments, drop its
            remaining loads and free its slot, or unpin it at the next flush."""
            for i in segments.pop(key, ()):
                failed[i] = error
            drop_loads(key)
            if self.pool.width(key) == 0:
                self.pool.release(key)  # reserved for the failed read, nothing resident
            elif key not in finished:
                finished.append(key)  # a lower width stays resident and valid

        def acquire(key: Key) -> bool:
            """A slot for ``key``, at the cost of queued prefetches' slots if every slot is pinned."""
            keep = self._unused.keys()
            while self.pool.acquire(key, keep) is None:
                if not self._reclaim_slot():
                    return False
            return True

        failed: dict[int, CheckpointError] = {}
        while segments:
            self._reap()
            # In plan order; once a load finds every slot pinned, only loads of experts that
            # hold a slot already (upgrades) may pass it, so pinned experts can always finish.
            blocked = False
            for load in list(queue):
                if in_flight >= self.max_in_flight:
                    break
                if load.key not in self.pool.slot_of and (blocked or not acquire(load.key)):
                    blocked = True
                    continue
                self.pool.pin(load.key)
                load.future = self._submit(load, counters)
                queue.remove(load)
                in_flight += 1
            if prefetch is not None:
                prefetch()
                prefetch = None
            progressed = False
            for key in list(segments):
                progressed |= compute_ready(key)
                chain = chains[key]
                while chain and chain[0].future is not None and chain[0].future.done():
                    progressed = True
                    try:
                        self._install(chain[0], counters)
                    except CheckpointError as error:
                        # Kept past this call (in `failed`) without its traceback, which holds this
                        # frame and, up its callers, the forward pass's: a reference cycle that kept
                        # a batch's activations alive until the cyclic GC ran (the soak's worker
                        # grew while reads failed).
                        error.with_traceback(None)
                        compute_ready(key)  # what the resident width serves still runs
                        damaged = isinstance(error, CorruptSectionsError)
                        if damaged:
                            counters.bad_sections += len(error.new_sections)
                        if not (damaged and degrade(key, error)):
                            give_up(key, error)
                        break
                    chain.popleft()
                    in_flight -= 1
                    compute_ready(key)
            flush()
            if progressed:
                continue
            futures = [c[0].future for c in chains.values() if c and c[0].future is not None]
            # Prefetches pin the slots they write: a demand blocked on a full pool waits for them too.
            futures += [p.future for p in self._prefetches.values() if p.write_ahead]
            if not futures:
                raise RuntimeError("d2moe offload pipeline stalled: no read in flight and nothing to compute")
            start = time.perf_counter()
            wait(futures, return_when=FIRST_COMPLETED)
            counters.wait_seconds += time.perf_counter() - start
        return failed

    @staticmethod
    def _settle(loads) -> None:
        """Cancel those of ``loads`` not started and wait for the others: afterwards no I/O thread
        reads for them or writes into their slots, which may then be released or reused."""
        wait([load.future for load in loads if load.future is not None and not load.future.cancel()])

    def _submit(self, load: _Load, counters: LayerCounters) -> Future:
        slot = self.pool.slot_of[load.key]
        if self.executor is not None:
            return self.executor.submit(DEMAND, self._fetch, load, slot)
        future = Future()  # no overlap: the compute thread reads, and waits for it
        try:
            result = self._fetch(load, slot)
        except Exception as e:  # noqa: BLE001 (raised at install, like a background read's)
            set_failed(future, e)
        else:
            future.set_result(result)
            counters.wait_seconds += result[2]
        return future

    def _fetch(self, load: _Load, slot: int) -> tuple[SectionBytes | None, int, float, int | None]:
        """Read ``load`` (timed); a new expert is also written into its reserved slot here, so that
        an I/O thread, not the compute thread, converts it to the kernels' layout. Every other load
        (an upgrade, or without MWQ reuse a whole re-read) is written at install: the slot's
        resident width may be computing meanwhile, and the chain's earlier loads install first.
        Returns the bytes (``None`` once written), their count, the read's seconds and the width
        written."""
        layer, expert = load.key
        start = time.perf_counter()
        # A new expert's bytes are written into its slot below, on this thread: the thread's buffer serves.
        data = self.store.read(layer, expert, load.first, load.last, scratch=load.write_ahead)
        seconds = time.perf_counter() - start
        if not load.write_ahead:
            return data, data.nbytes, seconds, None
        return None, data.nbytes, seconds, self.pool.write(slot, data.tensors(self.store.layout(layer)))

    def _install(self, load: _Load, counters: LayerCounters) -> None:
        data, nbytes, seconds, width = load.future.result()
        counters.io_seconds += seconds
        if load.prefetch:
            counters.prefetch_reads += 1
            counters.bytes_prefetched += nbytes
        else:
            counters.bytes_read += nbytes
        layout = self.store.layout(load.key[0])
        if load.write_ahead:
            self.pool.publish(load.key, width)
        elif load.first == 0:  # a whole re-read (no MWQ reuse) over a resident width
            self.pool.publish(load.key, self.pool.write(self.pool.slot_of[load.key], data.tensors(layout)))
        else:
            self.pool.store_planes(load.key, data.planes(layout), self.pool.min_bits + load.last)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
