"""Packing of binary planes: 8 weights per byte along the last dimension,
least-significant bit first; rows whose length is not a multiple of 8 are
padded with zero bits."""

import torch


def packed_length(n: int) -> int:
    """Bytes needed for ``n`` bits."""
    return (n + 7) // 8


_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a {0,1} tensor ``[..., n]`` into uint8 ``[..., ceil(n/8)]``."""
    n = bits.shape[-1]
    pad = packed_length(n) * 8 - n
    bits = bits.to(torch.uint8)
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    grouped = bits.reshape(*bits.shape[:-1], -1, 8)
    return (grouped * _BIT_WEIGHTS.to(bits.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., ceil(n/8)]`` -> {0,1} uint8 ``[..., n]``."""
    bits = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :n]
