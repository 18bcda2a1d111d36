"""Offload error paths (issue 17): slots on failed calls, files deleted while serving, damaged planes.

The offloaded layer runs against the same experts held resident with the same
kernels, as in ``test_offload.py``, and agrees up to the float32 order of each
token's weighted sum: rtol 1e-5. Faults are injected through the store (``read_at``,
the positional read it performs, or a wrapper of its ``read``) and the pool
(a wrapper of ``write``), and by damaging a copy of the checkpoint's files.
"""

import errno
import gc
import logging
import pickle
import random
import shutil
import threading
import time
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from vllm_d2moe.experts import load_layer_experts
from vllm_d2moe.kernels import load_backend
from vllm_d2moe.mwq.checkpoint import (
    EXPERTS_DIR,
    CheckpointError,
    CorruptSectionsError,
    MWQCheckpoint,
    read_buffered,
)
from vllm_d2moe.mwq.quantize import MWQError
from vllm_d2moe.offload import OffloadManager, metrics_snapshots
from vllm_d2moe.offload.pipeline import OffloadPolicy
from vllm_d2moe.offload.pool import expert_nbytes
from vllm_d2moe.offload.store import ExpertStore
from vllm_d2moe.vllm_glue.metrics import PrometheusPublisher

MIN_BITS, MAX_BITS = 2, 8  # the session model_zoo conversion's widths
LAYER_FILE = "experts-layer-001.safetensors"
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def backend():
    return load_backend("cpu_bitplanes")  # the reference backend dequantizes every call: 40x slower here


@pytest.fixture(scope="module")
def resident(checkpoint, backend):
    """Layer 1's eight experts held resident, read from the intact checkpoint."""
    return load_layer_experts(checkpoint, 1, list(range(8)), MAX_BITS, 0, 1, backend)


@pytest.fixture
def copy(model, tmp_path) -> Path:
    """A copy of the model that the test may damage."""
    return Path(shutil.copytree(model, tmp_path / "model"))


def budget_for(checkpoint: MWQCheckpoint, slots: int) -> int:
    # A few bytes over: a backend's layout may add read slack per tensor.
    return slots * expert_nbytes(checkpoint.layer(0).layout, MAX_BITS) + 1024


# ---------------------------------------------------------------- slots on failed calls

class SlotWatch:
    """A manager's store and pool, instrumented: each expert's reads are slowed by ``delays``,
    the write of an expert in ``failing_writes`` raises (as ``pool.write`` can), a read of an
    ``(expert, width)`` in ``failing_reads`` fails (after its delay), and every write checks, when
    it starts and when it ends, that its slot is still reserved for the expert it writes."""

    def __init__(self, manager: OffloadManager):
        self.pool = manager.pool
        self.delays: dict[int, float] = {}
        self.failing_writes: set[int] = set()
        self.failing_reads: set[tuple[int, int]] = set()
        self.misplaced: list[str] = []
        self._writer = threading.local()
        read, write = manager.store.read, manager.pool.write

        def slow_read(layer, expert, first, last, scratch=False):
            self._writer.key = (layer, expert)
            time.sleep(self.delays.get(expert, 0.0))
            if (expert, MIN_BITS + last) in self.failing_reads:
                raise CheckpointError(f"injected: layer {layer} expert {expert} sections {first}..{last}")
            return read(layer, expert, first, last, scratch)

        def checked_write(slot, tensors):
            key = getattr(self._writer, "key", None)
            if key is None:  # on the compute thread, at install: the pipeline's own, in order
                return write(slot, tensors)
            self._check(slot, key, "starts")
            if key[1] in self.failing_writes:
                raise MWQError(f"injected: writing layer {key[0]} expert {key[1]}")
            width = write(slot, tensors)
            self._check(slot, key, "ends")
            return width

        manager.store.read = slow_read
        manager.pool.write = checked_write

    def _check(self, slot: int, key, when: str) -> None:
        holder = self.pool.keys[slot]
        if holder != key:
            self.misplaced.append(f"a write of {key} {when} in slot {slot}, which holds {holder}")


RACE_POLICIES = {
    "pipeline": OffloadPolicy(io_threads=2),
    "no-reuse": OffloadPolicy(io_threads=2, reuse=False),  # every load writes its slot
    "no-keep": OffloadPolicy(io_threads=3, keep=False),
}


@pytest.mark.parametrize("policy", sorted(RACE_POLICIES))
def test_failed_calls_release_slots_only_after_their_reads(checkpoint, backend, resident, policy):
    """Calls that fail (a write raising, a read failing for good) while other reads of the call are
    slow: no write may land in a slot that was released or given to another expert meanwhile, and
    every clean call after them is exact. Randomised calls, seeded."""
    rng = random.Random(17)
    faults = []
    manager = OffloadManager(checkpoint, budget_for(checkpoint, 3), MAX_BITS, RACE_POLICIES[policy], backend,
                             fault_sink=faults.append)
    watch = SlotWatch(manager)
    layer = manager.layer(1, list(range(8)), MAX_BITS)
    gen = torch.Generator().manual_seed(17)
    clean_calls = 0
    for _ in range(40):
        tokens = rng.randint(3, 8)
        x, weights = torch.randn(tokens, 128, generator=gen), torch.rand(tokens, 2, generator=gen)
        ids = torch.tensor([rng.sample(range(8), 2) for _ in range(tokens)])
        widths = torch.tensor([[rng.randint(MIN_BITS, MAX_BITS) for _ in range(2)] for _ in range(tokens)],
                              dtype=torch.int8)
        victim = rng.choice(ids.flatten().tolist())
        watch.delays = {e: rng.uniform(0.002, 0.008) for e in range(8)}
        watch.delays[victim] = 0.0
        fault = rng.choice(["write", "read", "none"])
        watch.failing_writes = {victim} if fault == "write" else set()
        lowest = int(widths[ids == victim].min())
        watch.failing_reads = {(victim, lowest)} if fault == "read" else set()
        faults.clear()
        try:
            out = layer.forward(x, weights, ids, widths)
        except MWQError as e:
            assert "injected" in str(e)
            continue
        if not faults:
            torch.testing.assert_close(out, resident.forward(x, weights, ids, widths), **TOLERANCE)
            clean_calls += 1
    assert not watch.misplaced, watch.misplaced[:5]
    assert clean_calls >= 10
    assert not manager.pool.pinned


def test_full_reloads_never_write_a_slot_that_is_published(checkpoint, backend, resident):
    """Without MWQ reuse an expert needed at 5 and 8 bits is read whole twice; the 5-bit read is
    slow, so it arrives after the 8-bit one. Neither may overwrite what the other published."""
    manager = OffloadManager(checkpoint, budget_for(checkpoint, 2), MAX_BITS,
                             OffloadPolicy(io_threads=2, reuse=False), backend)
    read = manager.store.read

    def slow_narrow_read(layer, expert, first, last, scratch=False):
        time.sleep(0.05 if MIN_BITS + last == 5 else 0.0)
        return read(layer, expert, first, last, scratch)

    manager.store.read = slow_narrow_read
    layer = manager.layer(1, list(range(8)), MAX_BITS)
    x, weights = torch.randn(2, 128), torch.rand(2, 2)
    ids, widths = torch.tensor([[3, -1], [3, -1]]), torch.tensor([[5, 8], [8, 5]], dtype=torch.int8)
    torch.testing.assert_close(layer.forward(x, weights, ids, widths), resident.forward(x, weights, ids, widths),
                               **TOLERANCE)


# ---------------------------------------------------------------- files opened at start-up

def test_deleted_expert_file_keeps_serving_without_a_prior_read(copy, backend, resident):
    """The store is made, the file deleted, and only then is anything read."""
    manager = OffloadManager(MWQCheckpoint(copy), budget_for(MWQCheckpoint(copy), 2), MAX_BITS, OffloadPolicy(),
                             backend)
    layer = manager.layer(1, list(range(8)), MAX_BITS)
    (copy / EXPERTS_DIR / LAYER_FILE).unlink()
    gen = torch.Generator().manual_seed(0)
    x, weights = torch.randn(6, 128, generator=gen), torch.rand(6, 2, generator=gen)
    ids = torch.randint(0, 8, (6, 2), generator=gen)
    widths = torch.randint(MIN_BITS, MAX_BITS + 1, (6, 2), generator=gen).to(torch.int8)
    torch.testing.assert_close(layer.forward(x, weights, ids, widths), resident.forward(x, weights, ids, widths),
                               **TOLERANCE)


def test_store_refuses_a_missing_expert_tensor_at_start(copy):
    """Every expert's extent is resolved when the store is made: a renamed tensor is an error then,
    naming the file and the tensor, not at the first read of that expert."""
    path = copy / EXPERTS_DIR / LAYER_FILE
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"layers.1.experts.5"', b'"layers.1.experts.x"', 1))
    with pytest.raises(CheckpointError, match=f"{path}: tensor layers.1.experts.5 is missing"):
        ExpertStore(MWQCheckpoint(copy))


# ---------------------------------------------------------------- damaged planes

class SectionReads:
    """A ``read_at`` that counts the reads overlapping given byte ranges of the layer-1 file; those
    overlapping a range named in ``failing`` fail with EIO, as a bad disk's would."""

    def __init__(self, ranges: dict[str, tuple[int, int]], failing: tuple[str, ...] = ()):
        self.ranges, self.failing = ranges, failing
        self.counts = dict.fromkeys(ranges, 0)

    def __call__(self, fd, offset, length, into=None):
        for name, (lo, hi) in self.ranges.items():
            if offset < hi and lo < offset + length:
                self.counts[name] += 1
                if name in self.failing:
                    raise OSError(errno.EIO, "injected I/O error")
        return read_buffered(fd, offset, length, into)


def damage(copy: Path, checkpoint: MWQCheckpoint, expert: int, section: int, how: str) -> tuple[int, int]:
    """Flip a byte of ``section`` of layer 1 ``expert`` (``corrupt``) or cut the file inside it
    (``truncate``: only for the last expert); return the section's byte range in the file."""
    _, offset, nbytes = checkpoint.expert_extent(1, expert)
    lo, hi = (offset + x for x in checkpoint.layer(1).layout.section_range(section))
    path = copy / EXPERTS_DIR / LAYER_FILE
    data = bytearray(path.read_bytes())
    if how == "corrupt":
        data[(lo + hi) // 2] ^= 0xFF
    else:
        assert offset + nbytes == len(data)
        del data[(lo + hi) // 2:]
    path.write_bytes(bytes(data))
    return lo, hi


# Pairs of layer 1: expert 7 at 8 bits (tokens 0 and 1), at 4 bits (tokens 1 and 3).
IDS = torch.tensor([[7, 1], [2, 7], [1, 2], [7, 3], [0, 5]])
WIDTHS = torch.tensor([[8, 8], [4, 8], [8, 8], [4, 4], [8, 8]], dtype=torch.int8)


@contextmanager
def plugin_log():
    """The plugin's log records while the block runs (its logger may not propagate: under vLLM it
    logs through vLLM's handlers)."""
    records, handler, logger = [], logging.Handler(), logging.getLogger("vllm_d2moe")
    handler.emit = records.append
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def offloaded(copy, checkpoint, backend, mode: str, reads: SectionReads, faults: list):
    damaged = MWQCheckpoint(copy)
    store = ExpertStore(damaged, read_at=reads)
    manager = OffloadManager(damaged, budget_for(checkpoint, 6), MAX_BITS, OffloadPolicy(on_read_error=mode),
                             backend, store=store, fault_sink=faults.append)
    return manager, manager.layer(1, list(range(8)), MAX_BITS)


@pytest.mark.parametrize("how", ["corrupt", "truncate"])
def test_degrade_serves_the_widest_intact_width(copy, checkpoint, backend, resident, how):
    """Plane 6 of expert 7 damaged: its 8-bit pairs are served at 7 bits, its 4-bit ones exactly;
    the plane is read once, logged once and counted once; every degraded pair is counted."""
    reads = SectionReads({"plane 6": damage(copy, checkpoint, 7, 6, how)})
    faults = []
    manager, layer = offloaded(copy, checkpoint, backend, "degrade", reads, faults)
    x, weights = torch.randn(5, 128), torch.rand(5, 2)
    served = torch.where((IDS == 7) & (WIDTHS == 8), 7, WIDTHS).to(torch.int8)
    with plugin_log() as records:
        for _ in range(2):  # the second call finds 7 bits resident and knows plane 6 is bad
            out = layer.forward(x, weights, IDS, WIDTHS)
            assert not faults, faults
            torch.testing.assert_close(out, resident.forward(x, weights, IDS, served), **TOLERANCE)
    assert reads.counts["plane 6"] == 1
    counters = manager.metrics.snapshot()["layers"][1]
    assert counters["bad_sections"] == 1
    assert counters["degraded_pairs"] == 2 * 2  # two pairs a call
    registry = CollectorRegistry()  # /metrics: summed over the managers alive in this process
    PrometheusPublisher(publish_widths=False, registry=registry).publish()
    for field, series in (("bad_sections", "d2moe_bad_sections_total"),
                          ("degraded_pairs", "d2moe_degraded_pairs_total")):
        alive = sum(s["layers"].get(1, {}).get(field, 0) for s in metrics_snapshots())
        assert registry.get_sample_value(series, {"layer": "1"}) == alive >= counters[field]
    messages = [r.getMessage() for r in records]
    assert sum("layer 1 expert 7 section 6 (residual plane 6) is damaged" in m for m in messages) == 1, messages
    assert sum("served at up to 7 bits" in m for m in messages) == 1, messages
    assert not manager.pool.pinned and manager.pool.width((1, 7)) == 7


def test_fail_mode_fails_fast_without_rereading_the_bad_plane(copy, checkpoint, backend, resident):
    reads = SectionReads({"plane 6": damage(copy, checkpoint, 7, 6, "corrupt")})
    faults = []
    manager, layer = offloaded(copy, checkpoint, backend, "fail", reads, faults)
    x, weights = torch.randn(5, 128), torch.rand(5, 2)
    without = torch.where((IDS == 7) & (WIDTHS == 8), -1, IDS)
    for _ in range(2):
        faults.clear()
        out = layer.forward(x, weights, IDS, WIDTHS)
        torch.testing.assert_close(out, resident.forward(x, weights, without, WIDTHS), **TOLERANCE)
        (fault,) = faults
        assert (fault.expert, fault.width, fault.tokens.tolist()) == (7, 8, [0, 1])
        assert f"{LAYER_FILE}: checksum mismatch in layer 1 expert 7 section 6 (residual plane 6)" in fault.error
    assert reads.counts["plane 6"] == 1  # once, not once per retry and call
    counters = manager.metrics.snapshot()["layers"][1]
    assert counters["bad_sections"] == 1 and counters["degraded_pairs"] == 0
    assert not manager.pool.pinned and manager.pool.width((1, 7)) == 4


def test_degrade_without_an_intact_width_fails_the_pairs(copy, checkpoint, backend, resident):
    """A damaged base section leaves no width to serve: expert 7's pairs fail, read once."""
    reads = SectionReads({"base": damage(copy, checkpoint, 7, 0, "corrupt")})
    faults = []
    manager, layer = offloaded(copy, checkpoint, backend, "degrade", reads, faults)
    x, weights = torch.randn(5, 128), torch.rand(5, 2)
    for _ in range(2):
        faults.clear()
        out = layer.forward(x, weights, IDS, WIDTHS)
        torch.testing.assert_close(out, resident.forward(x, weights, torch.where(IDS == 7, -1, IDS), WIDTHS),
                                   **TOLERANCE)
        assert sorted((f.expert, f.width) for f in faults) == [(7, 4), (7, 8)]
        assert all("section 0 (base)" in f.error for f in faults)
    assert reads.counts["base"] == 1
    assert not manager.pool.pinned and (1, 7) not in manager.pool.slot_of


@pytest.mark.parametrize("how", ["read error", "corrupt"])
def test_failed_reads_leave_no_reference_cycles(copy, checkpoint, backend, how):
    """A failed expert read keeps no frame of the layer call alive in a reference cycle: a failed
    read's error held its traceback, the traceback this call's frames and, up their callers, the
    forward pass's with its activations, until the cyclic GC ran (the soak's worker grew while reads
    failed). Every object a collection finds unreachable is kept (``DEBUG_SAVEALL``) and checked."""
    if how == "corrupt":
        reads = SectionReads({"plane 6": damage(copy, checkpoint, 7, 6, "corrupt")})
    else:
        _, offset, nbytes = checkpoint.expert_extent(1, 7)
        reads = SectionReads({"expert 7": (offset, offset + nbytes)}, failing=("expert 7",))
    faults = []
    _, layer = offloaded(copy, checkpoint, backend, "fail", reads, faults)
    x, weights = torch.randn(5, 128), torch.rand(5, 2)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.garbage.clear()
        for _ in range(2):
            layer.forward(x, weights, IDS, WIDTHS)
        assert faults and all(f.expert == 7 for f in faults)
        faults.clear()
        gc.collect()
        cyclic = sorted({f"{o.f_code.co_name} ({Path(o.f_code.co_filename).name})" for o in gc.garbage
                         if isinstance(o, types.FrameType) and "vllm_d2moe" in o.f_code.co_filename})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not cyclic, f"frames kept alive in reference cycles: {cyclic}"


def test_damaged_sections_error_crosses_processes(copy, checkpoint):
    """The store's error, pickled as vLLM does between its processes, keeps what it names."""
    damage(copy, checkpoint, 7, 6, "corrupt")
    with pytest.raises(CorruptSectionsError) as raised:
        ExpertStore(MWQCheckpoint(copy)).read(1, 7, 0, 6)
    error = pickle.loads(pickle.dumps(raised.value))
    assert (str(error), error.layer, error.expert, error.sections, error.new_sections) == (
        str(raised.value), 1, 7, (6,), (6,))


def test_on_read_error_option_is_checked():
    assert OffloadPolicy.from_option(None).on_read_error == "degrade"
    assert OffloadPolicy.from_option({"io_threads": 1}, on_read_error="fail").on_read_error == "fail"
    with pytest.raises(ValueError, match="d2moe option 'on_read_error' must be 'fail' or 'degrade', got 'retry'"):
        OffloadPolicy.from_option(None, on_read_error="retry")
    with pytest.raises(ValueError, match="d2moe option 'offload' must be a dict with keys among"):
        OffloadPolicy.from_option({"on_read_error": "fail"})  # a top-level option, not an offload key
