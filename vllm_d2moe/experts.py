"""The expert weights of one MoE layer on this rank, and the grouped expert compute.

This is the one interface through which serving touches expert weights:
:func:`load_layer_experts` reads them from a d2moe checkpoint (tensor- and
expert-parallel slicing included), and :meth:`LayerExperts.forward` runs the
tokens routed to each (expert, width) segment through the kernel backend.
"""

import functools
from dataclasses import dataclass, replace
from itertools import accumulate
from types import ModuleType

import torch

from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
from vllm_d2moe.mwq.quantize import MWQError, MWQTensor
from vllm_d2moe.mwq.stacked import StackedProjection


@dataclass
class ExpertWeights:
    gate_up: MWQTensor  # [2 * intermediate_per_rank, hidden]
    down: MWQTensor  # [hidden, intermediate_per_rank]


@dataclass(frozen=True)
class TensorParallelSlice:
    """Rank ``rank`` of ``size``'s slice of an expert's intermediate dimension (vLLM's TP split of
    MoE): rows ``[start, start + part)`` of gate and the same rows of up, columns
    ``[start, start + part)`` of down.

    Every array of a projection (base bits, scales, zeros, each residual plane) has its rows on
    dim -2 and its columns, as packed bytes or as groups, on dim -1, so one rule per projection
    slices a whole expert and an upgrade's residual planes alike, and every array splits evenly.
    """

    rank: int
    size: int
    intermediate: int  # of a whole expert
    group_size: int

    def __post_init__(self):
        part = self.intermediate // self.size
        if self.size > 1 and (self.intermediate % self.size or part % (2 * self.group_size) or part % 8):
            raise MWQError(
                f"expert intermediate size {self.intermediate} does not split across tensor-parallel size "
                f"{self.size}: each rank's share of down's columns must be an even number of groups of "
                f"{self.group_size} (plane scale codes are packed two groups per byte) and whole packed "
                f"bytes (8 columns)"
            )

    @property
    def part(self) -> int:
        return self.intermediate // self.size

    @property
    def start(self) -> int:
        return self.rank * self.part

    def nbytes(self, whole: int) -> int:
        """Bytes of this rank's slice of arrays holding ``whole`` bytes (every array splits evenly)."""
        return whole // self.size

    def expert(self, tensors: dict[str, MWQTensor]) -> ExpertWeights:
        gate_up, down = tensors["gate_up"], tensors["down"]
        if self.size == 1:
            return ExpertWeights(gate_up, down)
        return ExpertWeights(
            replace(gate_up.map_tensors(self._gate_up_rows), shape=(2 * self.part, gate_up.shape[1])),
            replace(down.map_tensors(self._down_columns), shape=(down.shape[0], self.part)),
        )

    def planes(self, planes: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, list]:
        """This rank's slice of whole-expert residual ``(bits, scale)`` planes, per projection."""
        if self.size == 1:
            return planes
        cut = {"gate_up": self._gate_up_rows, "down": self._down_columns}
        return {proj: [(cut[proj](b), cut[proj](s)) for b, s in pairs] for proj, pairs in planes.items()}

    def _gate_up_rows(self, array: torch.Tensor) -> torch.Tensor:
        gate = array.narrow(-2, self.start, self.part)
        up = array.narrow(-2, self.intermediate + self.start, self.part)
        return torch.cat([gate, up], dim=-2)

    def _down_columns(self, array: torch.Tensor) -> torch.Tensor:
        # The last dim counts packed bytes or groups: the same share of it as of the columns.
        units = array.shape[-1] // self.size
        # Copied out of its strided view so the whole expert's bytes can be freed.
        return array.narrow(-1, self.rank * units, units).contiguous()


def shard_expert(tensors: dict[str, MWQTensor], tp_rank: int, tp_size: int) -> ExpertWeights:
    """This rank's slice of a whole expert (:class:`TensorParallelSlice`)."""
    down = tensors["down"]
    return TensorParallelSlice(tp_rank, tp_size, down.shape[1], down.group_size).expert(tensors)


@dataclass(frozen=True)
class ExpertSegments:
    """(token, expert) pairs sorted by (expert, width): segment ``i`` is rows
    ``starts[i] : starts[i + 1]`` of the gathered inputs, computed by expert
    ``experts[i]`` at width ``bits[i]``."""

    experts: tuple[int, ...]
    bits: tuple[int, ...]
    starts: tuple[int, ...]


class LayerExperts:
    """Resident expert weights of one layer at a width ``bits``, indexed by local expert id.

    A backend with a ``prepare`` hook keeps each projection in its own resident
    layout (built here, once); it replaces the stacked tensors, so memory stays
    at the packed bytes.
    """

    def __init__(self, gate_up: StackedProjection, down: StackedProjection, bits: int, backend: ModuleType):
        prepare = getattr(backend, "prepare", None)
        self.gate_up = prepare(gate_up) if prepare else gate_up
        self.down = prepare(down) if prepare else down
        self.bits = bits
        self.backend = backend
        bind = getattr(backend, "bind", None)
        self._forward = (
            bind(self.gate_up, self.down)
            if bind
            else functools.partial(backend_forward, backend, self.gate_up, self.down)
        )

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    def forward(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        local_ids: torch.Tensor,
        widths: torch.Tensor,
    ) -> torch.Tensor:
        """Weighted sum of expert outputs; ``local_ids`` of -1 (experts on other ranks) are skipped.

        Pairs are sorted by (expert, width) and the backend computes all the
        resulting segments in one call, or the whole sum when it has ``layer_forward``
        (through its ``bind`` when it has one: the layer's tensors handed over once).
        """
        return self._forward(x, topk_weights, local_ids, widths)


def backend_forward(backend, gate_up, down, x, topk_weights, local_ids, widths) -> torch.Tensor:
    """:meth:`LayerExperts.forward` over resident projections ``gate_up`` / ``down`` indexed by ``local_ids``."""
    if hasattr(backend, "layer_forward"):
        return backend.layer_forward(x, topk_weights, local_ids, widths, gate_up, down)
    return routed_sum(
        x, topk_weights, local_ids, widths,
        lambda xs, segments, y: backend.grouped_mlp(xs, gate_up, down, segments, y),
    )


def routed_sum(x, topk_weights, local_ids, widths, compute) -> torch.Tensor:
    """``sum_k topk_weights[t, k] * expert(x[t])`` with the experts run by ``compute``.

    (token, expert) pairs with ``local_ids >= 0`` are sorted by (expert, width);
    ``compute(xs, segments, y)`` must write every row of ``y`` (float32) with the
    MLP of its segment's expert and width applied to the same row of ``xs``.
    """
    top_k = local_ids.shape[1]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    # Experts of other ranks (-1) get negative keys and sort first.
    keys = local_ids.reshape(-1).long() * 16 + widths.reshape(-1).long()
    sorted_keys, order = torch.sort(keys, stable=True)
    segment_keys, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
    runs = [(k, n) for k, n in zip(segment_keys.tolist(), counts.tolist()) if k >= 0]
    if not runs:
        return out.to(x.dtype)
    order = order[order.numel() - sum(n for _, n in runs) :]
    experts, bits = zip(*(divmod(k, 16) for k, _ in runs))
    segments = ExpertSegments(experts, bits, tuple(accumulate((n for _, n in runs), initial=0)))
    tokens = order // top_k
    y = torch.empty(order.numel(), x.shape[1], dtype=torch.float32, device=x.device)
    compute(x[tokens], segments, y)
    y *= topk_weights.reshape(-1)[order].float().unsqueeze(1)
    out.index_add_(0, tokens, y)
    return out.to(x.dtype)


def load_layer_experts(
    checkpoint: MWQCheckpoint,
    layer: int,
    global_ids: list[int],
    bits: int,
    tp_rank: int,
    tp_size: int,
    backend: ModuleType,
    device: torch.device | str = "cpu",
) -> LayerExperts:
    """Read this rank's experts (``global_ids``, in local order) of ``layer`` at width ``bits``.

    Each expert is copied into the layer's stacked tensors as it is read, so
    loading holds one layer plus one expert (and, while a backend's ``prepare``
    runs, its copy of the layer).
    """
    if not global_ids:
        raise MWQError(f"layer {layer}: no experts assigned to this rank")
    gate_up = down = None
    for local, e in enumerate(global_ids):
        weights = shard_expert(checkpoint.read_expert(layer, e, bits), tp_rank, tp_size)
        if gate_up is None:
            gate_up = StackedProjection.allocate(weights.gate_up, len(global_ids), device)
            down = StackedProjection.allocate(weights.down, len(global_ids), device)
        gate_up.store(local, weights.gate_up)
        down.store(local, weights.down)
    return LayerExperts(gate_up, down, bits, backend)
