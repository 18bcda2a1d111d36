"""The resident pool: fixed slots of expert data under the memory budget, shared by all MoE layers.

All MoE layers of a model have experts of one shape, so the pool is one pair of
resident projections (the kernel backend's layout, e.g. ``PlanePairs``) with a
slot per expert, allocated once at the widest serving width. A slot holds one
``(layer, expert)`` at some width; the kernels read it by slot index like a
resident layer's expert, and a narrower width reads a prefix of its planes.
Under tensor parallelism a slot holds this rank's slice of the expert, cut
from whatever the store read: a whole prefix, or an upgrade's residual planes.

Eviction keeps the experts with the highest recent activation frequency
(routed-token counts decayed by half every ``FREQUENCY_HALF_LIFE`` layer calls)
per layer call until their layer's next call: MoE layers are called in a cycle,
so an expert of the layer after the current one is needed at once and one of the
layer just called only a cycle later (frequency alone evicted the next layer's
experts first when a call's reads took their slots early; see
``benchmarks/results/streamed_pipeline.md``).
Pinned slots (what the current layer call still computes or loads, or a
prefetch still writes) are never evicted; experts prefetched for a coming layer
go last, and a prefetch never evicts them.
"""

from types import ModuleType

import torch

from vllm_d2moe.byte_sizes import format_bytes
from vllm_d2moe.experts import TensorParallelSlice
from vllm_d2moe.mwq.layout import ExpertLayout
from vllm_d2moe.mwq.quantize import MWQTensor
from vllm_d2moe.mwq.stacked import StackedProjection

FREQUENCY_HALF_LIFE = 32  # layer calls
Key = tuple[int, int]  # (layer, expert)


class BudgetError(ValueError):
    """The memory budget cannot hold what serving needs."""


def expert_nbytes(layout: ExpertLayout, bits: int, tp_size: int = 1) -> int:
    """Resident bytes of one expert at width ``bits`` (its pieces without the blob's alignment), or
    of one rank's slice of it under tensor-parallel size ``tp_size``."""
    whole = sum(p.nbytes for section in layout.sections[: bits - layout.spec.min_bits + 1] for p in section)
    return _tp_slice(layout, 0, tp_size).nbytes(whole)


def _tp_slice(layout: ExpertLayout, tp_rank: int, tp_size: int) -> TensorParallelSlice:
    return TensorParallelSlice(tp_rank, tp_size, layout.intermediate, layout.spec.group_size)


def _one_expert(tp_size: int, width: str) -> str:
    if tp_size == 1:
        return f"one expert {width}"
    return f"this rank's 1/{tp_size} slice of one expert {width} (tensor-parallel size {tp_size})"


def check_budget(budget: int, layout: ExpertLayout, bits: int, tp_size: int = 1) -> None:
    """The budget (per rank) must hold one expert, or under tensor parallelism one rank's slice of
    one, at the widest width a batch can ask for."""
    need = expert_nbytes(layout, bits, tp_size)
    if budget < need:
        raise BudgetError(
            f"d2moe option 'memory_budget' is {budget} bytes ({format_bytes(budget)}); serving at up to "
            f"{bits} bits needs at least {need} bytes ({format_bytes(need)}), {_one_expert(tp_size, 'at that width')}"
        )


class ResidentPool:
    """``slots`` experts at up to ``bits`` bits each, in ``backend``'s resident layout; under tensor
    parallelism (``tp_size > 1``) each slot holds rank ``tp_rank``'s slice of its expert."""

    def __init__(self, layout: ExpertLayout, bits: int, budget: int, backend: ModuleType, device="cpu",
                 tp_rank: int = 0, tp_size: int = 1):
        check_budget(budget, layout, bits, tp_size)
        self.tp_slice = _tp_slice(layout, tp_rank, tp_size)
        like = self.tp_slice.expert(layout.decode(torch.zeros(layout.nbytes(bits), dtype=torch.uint8), bits))
        prepare = getattr(backend, "prepare", lambda projection: projection)

        def allocate(slots: int):
            return [prepare(StackedProjection.allocate(p, slots, device)) for p in (like.gate_up, like.down)]

        self.slot_nbytes = expert_nbytes(layout, bits, tp_size)
        # A backend's layout may add a few bytes per tensor (the CPU kernel's read slack).
        overhead = sum(p.nbytes for p in allocate(1)) - self.slot_nbytes
        slots = (budget - overhead) // self.slot_nbytes
        if slots < 1:
            need = self.slot_nbytes + overhead
            raise BudgetError(
                f"d2moe option 'memory_budget' is {budget} bytes ({format_bytes(budget)}); the "
                f"{backend.NAME} kernels need at least {need} bytes ({format_bytes(need)}) for "
                f"{_one_expert(tp_size, f'at {bits} bits')}"
            )
        self.gate_up, self.down = allocate(slots)
        self.budget = budget
        self.bits = bits
        self.min_bits = layout.spec.min_bits
        self.nbytes = self.gate_up.nbytes + self.down.nbytes
        assert self.nbytes <= budget, (self.nbytes, budget)
        self.keys: list[Key | None] = [None] * slots
        self.widths = [0] * slots
        self.slot_of: dict[Key, int] = {}
        self.pinned: set[int] = set()
        self.step = 0
        self._scores: dict[Key, tuple[float, int]] = {}
        self._cycle: dict[int, int] = {}  # MoE layer -> its place in the call cycle
        self._calling: int | None = None  # the layer whose call runs now
        self.on_evict = None  # called with the key of each expert evicted for another

    @property
    def num_slots(self) -> int:
        return len(self.keys)

    @property
    def occupied(self) -> int:
        return len(self.slot_of)

    @property
    def occupancy_nbytes(self) -> int:
        return self.occupied * self.slot_nbytes

    def width(self, key: Key) -> int:
        """Resident width of ``key`` (0: not resident, or a slot reserved for a load)."""
        slot = self.slot_of.get(key)
        return 0 if slot is None else self.widths[slot]

    def add_layer(self, layer: int) -> None:
        """A MoE layer whose experts the pool holds (layers are called in increasing order)."""
        self._cycle = {m: i for i, m in enumerate(sorted({*self._cycle, layer}))}

    def calling(self, layer: int) -> None:
        """Layer ``layer``'s call starts: eviction counts the other layers' distance from it."""
        self._calling = layer

    def calls_until_needed(self, key: Key) -> int:
        """Layer calls from now until ``key``'s layer is called again (1: the next call; the current
        layer's: a whole cycle); 1 for every layer before any call."""
        if self._calling not in self._cycle or key[0] not in self._cycle:
            return 1
        return (self._cycle[key[0]] - self._cycle[self._calling] - 1) % len(self._cycle) + 1

    def touch(self, tokens: dict[Key, int]) -> None:
        """Count one layer call's routed tokens per expert into the decayed frequencies."""
        self.step += 1
        for key, n in tokens.items():
            self._scores[key] = (self.frequency(key) + n, self.step)

    def frequency(self, key: Key) -> float:
        score, step = self._scores.get(key, (0.0, self.step))
        return score * 0.5 ** ((self.step - step) / FREQUENCY_HALF_LIFE)

    def acquire(self, key: Key, keep: set[Key] | frozenset[Key] = frozenset(), colder_than: float | None = None
                ) -> int | None:
        """A slot for ``key``: its own, a free one, or the unpinned one's with the least frequency per
        call until it is needed (evicted), experts in ``keep`` (prefetched for a coming layer) last.
        With ``colder_than`` (a prefetch, which expects ``key`` to route that many tokens) those in
        ``keep`` never, nor any expert that frequent; ``None`` while no slot can be had."""
        if key in self.slot_of:
            return self.slot_of[key]
        free = [s for s, k in enumerate(self.keys) if k is None]
        if free:
            slot = free[0]
        else:
            candidates = [s for s in range(self.num_slots) if s not in self.pinned and (
                colder_than is None or (self.keys[s] not in keep and self.frequency(self.keys[s]) < colder_than))]
            if not candidates:
                return None
            slot = min(candidates, key=lambda s: (
                self.keys[s] in keep, self.frequency(self.keys[s]) / self.calls_until_needed(self.keys[s])))
            evicted = self.keys[slot]
            del self.slot_of[evicted]
            if self.on_evict is not None:
                self.on_evict(evicted)
        self.keys[slot], self.widths[slot] = key, 0
        self.slot_of[key] = slot
        return slot

    def release(self, key: Key) -> None:
        slot = self.slot_of.pop(key, None)
        if slot is not None:
            self.keys[slot], self.widths[slot] = None, 0
            self.pinned.discard(slot)

    def pin(self, key: Key) -> None:
        self.pinned.add(self.slot_of[key])

    def unpin(self, key: Key) -> None:
        self.pinned.discard(self.slot_of[key])

    def write(self, slot: int, tensors: dict[str, MWQTensor]) -> int:
        """Write a whole expert into ``slot`` without making it visible; returns its width for
        :meth:`publish`. Safe off the compute thread for a slot reserved for this load (width 0: no
        call reads it; pinned: none evicts it)."""
        weights = self.tp_slice.expert(tensors)
        self.gate_up.store(slot, weights.gate_up)
        self.down.store(slot, weights.down)
        return weights.down.bits

    def publish(self, key: Key, width: int) -> None:
        """``key``'s slot now holds width ``width`` (written by :meth:`write`)."""
        self.widths[self.slot_of[key]] = width

    def store_planes(self, key: Key, planes: dict[str, list], width: int) -> None:
        """Upgrade ``key``'s slot to ``width`` with the residual planes above its current width
        (whole-expert planes: a tensor-parallel rank keeps its slice)."""
        slot = self.slot_of[key]
        planes = self.tp_slice.planes(planes)
        first = self.widths[slot] - self.min_bits
        assert first + len(planes["down"]) == width - self.min_bits, (self.widths[slot], width)
        self.gate_up.store_planes(slot, first, planes["gate_up"])
        self.down.store_planes(slot, first, planes["down"])
        self.widths[slot] = width

    def entries(self) -> list[tuple[int, int, int]]:
        """``(layer, expert, width)`` of every occupied slot."""
        return [(*k, self.widths[s]) for s, k in enumerate(self.keys) if k is not None]
