"""Residual plane scales stored as 4-bit codes relative to the group's base scale.

The least-squares scale of sign plane ``j`` (0-based) is the mean absolute residual
left by the widths below it; for a base rounded on a grid of step ``s`` that residual
is close to uniform on ``[-s/2, s/2]`` and every sign plane halves it, so
``a_j ~ s * 2**-(j + 2)``. A plane stores only the ratio to that, as a code
``c`` into :data:`RATIOS`::

    a_j[r, g] = s[r, g] * RATIOS[c_j[r, g]] * 2**-(j + 2)      (one multiply per group)

with ``s`` the float16 base scale. Code 0 is a zero scale (a group the lower widths
already reconstruct exactly). The ratios are dense around 1, where the reference
model's measured ratios lie (0.71-1.50 in all of its groups, 0.87-1.24 between the 1st
and 99th percentiles);
``benchmarks/results/plane_scales.md`` has the measurements behind the choice. Every
ratio is a multiple of ``2**-RATIO_UNIT_LOG2`` with at most 6 significant bits, so
``s * table`` is exact in float32: every kernel computes the same decoded scales bit
for bit, and the quantizer fits the later planes to exactly those values.

Codes are packed two per byte along the groups of a row (group ``2k`` in the low
nibble of byte ``k``, ``2k + 1`` in the high one; an odd last group leaves the high
nibble zero): a plane's codes are uint8 ``[rows, ceil(groups / 2)]``.
"""

import torch

CODE_BITS = 4
RATIOS = (0.0, 0.5, 0.625, 0.75, *(k / 32 for k in range(25, 35)), 1.1875, 1.5)
RATIO_UNIT_LOG2 = -5  # every ratio is a multiple of 2**-5
assert len(RATIOS) == 1 << CODE_BITS and list(RATIOS) == sorted(RATIOS)
assert all(float(r * 2**-RATIO_UNIT_LOG2).is_integer() and r * 32 < 64 for r in RATIOS)

_RATIOS = torch.tensor(RATIOS, dtype=torch.float64)
# Midpoints between neighbouring ratios: a scale's code is the number of midpoints below it.
_MIDPOINTS = (_RATIOS[1:] + _RATIOS[:-1]) / 2


def _plane_factor(plane: int) -> float:
    return 2.0 ** -(plane + 2)


def decode_table(planes: int) -> torch.Tensor:
    """float32 ``[planes, 16]``: entry ``[j, c]`` times the base scale is plane ``j``'s scale for code ``c``
    (the table every kernel decodes with)."""
    factors = torch.tensor([_plane_factor(j) for j in range(planes)], dtype=torch.float64)
    return (factors[:, None] * _RATIOS).float()


def encode_plane_scales(
    scale: torch.Tensor, base_scale: torch.Tensor, plane: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float plane scales ``scale [..., groups]`` of residual plane ``plane`` (0-based) of groups with
    float16 base scales ``base_scale`` -> (codes uint8 ``[..., groups]``, unpacked, and the decoded
    scales they stand for, float64, exact).

    Each code is the one whose decoded scale is nearest to ``scale`` (ties to the smaller), which
    for a sign plane is the one with the least squared error (a negative scale gets code 0, a
    zero scale). Fit later planes to the decoded scales, not to ``scale``. Pack the codes with
    :func:`pack_codes` to store them."""
    s = base_scale.double().unsqueeze(-1) * _plane_factor(plane)
    codes = (scale.double().unsqueeze(-1) > s * _MIDPOINTS.to(s.device)).sum(-1).to(torch.uint8)
    return codes, decode_plane_scales(codes, base_scale, plane).double()


def decode_plane_scales(codes: torch.Tensor, base_scale: torch.Tensor, plane: int) -> torch.Tensor:
    """Unpacked codes ``[..., groups]`` of residual plane ``plane`` -> its scales, float32 (exact)."""
    table = (_RATIOS * _plane_factor(plane)).float().to(codes.device)
    return base_scale.float() * table[codes.long()]


def packed_codes_length(groups: int) -> int:
    """Bytes per row of a plane's packed codes."""
    return (groups + 1) // 2


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[..., groups]`` (each < 16) -> uint8 ``[..., ceil(groups / 2)]``, two per byte."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_codes(packed: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[..., ceil(groups / 2)]`` -> uint8 ``[..., groups]``."""
    both = torch.stack([packed & 15, packed >> 4], dim=-1)
    return both.reshape(*packed.shape[:-1], -1)[..., :groups]
