"""The expert weights of one MoE layer on this rank, and the grouped expert compute.

This is the one interface through which serving touches expert weights:
:func:`load_layer_experts` reads them from a d2moe checkpoint (tensor- and
expert-parallel slicing included), and :meth:`LayerExperts.forward` runs the
tokens routed to each (expert, width) segment through the kernel backend.
"""

from dataclasses import dataclass
from types import ModuleType

import torch

from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
from vllm_d2moe.mwq.quantize import MWQError, MWQTensor


@dataclass
class ExpertWeights:
    gate_up: MWQTensor  # [2 * intermediate_per_rank, hidden]
    down: MWQTensor  # [hidden, intermediate_per_rank]

    def truncate(self, bits: int) -> "ExpertWeights":
        return ExpertWeights(self.gate_up.truncate(bits), self.down.truncate(bits))


def shard_expert(
    tensors: dict[str, MWQTensor], tp_rank: int, tp_size: int
) -> ExpertWeights:
    """This rank's slice of the expert intermediate dimension (vLLM's TP split of MoE)."""
    gate_up, down = tensors["gate_up"], tensors["down"]
    if tp_size == 1:
        return ExpertWeights(gate_up, down)
    inter = down.shape[1]
    if inter % tp_size:
        raise MWQError(
            f"expert intermediate size {inter} does not split across tensor-parallel size {tp_size}"
        )
    part = inter // tp_size
    start = tp_rank * part
    gate_up_part = MWQTensor.cat_rows(
        gate_up.narrow_rows(start, part), gate_up.narrow_rows(inter + start, part)
    )
    # Copy the down slice out of its strided view so the full blob can be freed.
    return ExpertWeights(gate_up_part, down.narrow_cols(start, part).map_tensors(torch.Tensor.contiguous))


class LayerExperts:
    """Resident expert weights of one layer at a width ``bits``, indexed by local expert id."""

    def __init__(self, experts: list[ExpertWeights], bits: int, backend: ModuleType):
        self.experts = experts
        self.bits = bits
        self.backend = backend

    @property
    def nbytes(self) -> int:
        return sum(e.gate_up.nbytes + e.down.nbytes for e in self.experts)

    def forward(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        local_ids: torch.Tensor,
        widths: torch.Tensor,
    ) -> torch.Tensor:
        """Weighted sum of expert outputs; ``local_ids`` of -1 (experts on other ranks) are skipped.

        Pairs are grouped by (expert, width) so that each segment is one
        kernel call over all its tokens.
        """
        top_k = local_ids.shape[1]
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        flat_ids = local_ids.reshape(-1).long()
        flat_widths = widths.reshape(-1).long()
        keep = flat_ids >= 0
        if not keep.any():
            return out.to(x.dtype)
        keys = flat_ids * 16 + flat_widths
        pairs = torch.nonzero(keep).squeeze(1)
        order = pairs[torch.argsort(keys[pairs], stable=True)]
        segment_keys, counts = torch.unique_consecutive(keys[order], return_counts=True)
        flat_weights = topk_weights.reshape(-1).float()
        start = 0
        for key, count in zip(segment_keys.tolist(), counts.tolist()):
            idx = order[start : start + count]
            start += count
            expert, bits = divmod(key, 16)
            weights = self.experts[expert].truncate(bits)
            tokens = idx // top_k
            y = self.backend.expert_mlp(x[tokens], weights.gate_up, weights.down)
            out.index_add_(0, tokens, y * flat_weights[idx].unsqueeze(1))
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
    """Read this rank's experts (``global_ids``, in local order) of ``layer`` at width ``bits``."""
    experts = []
    for e in global_ids:
        tensors = checkpoint.read_expert(layer, e, bits)
        weights = shard_expert(tensors, tp_rank, tp_size)
        if device != "cpu":
            weights = ExpertWeights(
                *(t.map_tensors(lambda a: a.to(device)) for t in (weights.gate_up, weights.down))
            )
        experts.append(weights)
    return LayerExperts(experts, bits, backend)
