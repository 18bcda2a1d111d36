"""A layer's experts resident in memory: one projection of every expert in one set of tensors.

The stacked form of :class:`~vllm_d2moe.mwq.quantize.MWQTensor` that serving
keeps (all experts loaded, or the offload pool's slots) and that the kernel
backends read or re-lay at load.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_d2moe.mwq.plane_scales import packed_codes_length
from vllm_d2moe.mwq.quantize import MWQError, MWQTensor


def check_storable(resident, expert: int, t: MWQTensor) -> None:
    """``t`` fits slot ``expert`` of a resident projection: same shape, grouping and base, no more planes."""
    if (
        t.shape != resident.shape
        or t.group_size != resident.group_size
        or t.min_bits != resident.min_bits
        or t.bits > resident.bits
    ):
        raise MWQError(
            f"expert {expert}: {t.shape}@{t.min_bits}-{t.bits}b (group {t.group_size}) does not fit "
            f"the layer's {resident.shape}@{resident.min_bits}-{resident.bits}b (group {resident.group_size})"
        )


@dataclass(frozen=True)
class StackedProjection:
    """One projection of every expert of a layer, resident in one set of tensors.

    The fields of the experts' :class:`MWQTensor` stacked on a leading expert
    dimension, with the same bit packing, so kernels reach any (expert, width)
    by offsets alone and one launch can cover several experts::

        base_bits   uint8   [experts, min_bits, rows, ceil(cols / 8)]
        base_scale  float16 [experts, rows, groups]
        base_zero   float16 [experts, rows, groups]
        plane_bits  uint8   [experts, residual planes, rows, ceil(cols / 8)]
        plane_scale uint8   [experts, residual planes, rows, ceil(groups / 2)]   (4-bit codes)
    """

    shape: tuple[int, int]
    group_size: int
    base_bits: torch.Tensor
    base_scale: torch.Tensor
    base_zero: torch.Tensor
    plane_bits: torch.Tensor
    plane_scale: torch.Tensor

    @staticmethod
    def allocate(like: MWQTensor, experts: int, device: torch.device | str) -> "StackedProjection":
        """Uninitialised room for ``experts`` tensors shaped like ``like``."""
        rows = like.shape[0]
        packed = like.base_bits.shape[-1]
        groups = like.base_scale.shape[-1]
        planes = len(like.planes)

        def empty(*shape, dtype):
            return torch.empty(experts, *shape, dtype=dtype, device=device)

        return StackedProjection(
            shape=like.shape,
            group_size=like.group_size,
            base_bits=empty(like.min_bits, rows, packed, dtype=torch.uint8),
            base_scale=empty(rows, groups, dtype=like.base_scale.dtype),
            base_zero=empty(rows, groups, dtype=like.base_zero.dtype),
            plane_bits=empty(planes, rows, packed, dtype=torch.uint8),
            plane_scale=empty(planes, rows, packed_codes_length(groups), dtype=torch.uint8),
        )

    def store(self, expert: int, t: MWQTensor) -> None:
        """Write ``t`` as expert ``expert``; a narrower ``t`` leaves the planes above it as they were."""
        check_storable(self, expert, t)
        self.base_bits[expert].copy_(t.base_bits)
        self.base_scale[expert].copy_(t.base_scale)
        self.base_zero[expert].copy_(t.base_zero)
        self.store_planes(expert, 0, t.planes)

    def store_planes(self, expert: int, first: int, planes: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write residual planes ``first, first + 1, ...`` of expert ``expert`` (a width upgrade in place)."""
        for j, (bits, scale) in enumerate(planes, start=first):
            self.plane_bits[expert, j].copy_(bits)
            self.plane_scale[expert, j].copy_(scale)

    @property
    def min_bits(self) -> int:
        return self.base_bits.shape[1]

    @property
    def bits(self) -> int:
        return self.min_bits + self.plane_bits.shape[1]

    @property
    def num_experts(self) -> int:
        return self.base_bits.shape[0]

    def expert(self, expert: int, bits: int | None = None) -> MWQTensor:
        """Expert ``expert`` at width ``bits`` (default: all resident planes), as views."""
        bits = self.bits if bits is None else bits
        if not self.min_bits <= bits <= self.bits:
            raise MWQError(f"width {bits} is outside the resident [{self.min_bits}, {self.bits}]")
        return MWQTensor(
            shape=self.shape,
            group_size=self.group_size,
            base_bits=self.base_bits[expert],
            base_scale=self.base_scale[expert],
            base_zero=self.base_zero[expert],
            planes=tuple(
                (self.plane_bits[expert, j], self.plane_scale[expert, j]) for j in range(bits - self.min_bits)
            ),
        )

    @property
    def nbytes(self) -> int:
        tensors = [self.base_bits, self.base_scale, self.base_zero, self.plane_bits, self.plane_scale]
        return sum(t.numel() * t.element_size() for t in tensors)
