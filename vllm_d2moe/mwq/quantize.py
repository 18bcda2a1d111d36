"""Matryoshka weight quantization (MWQ) of one weight matrix.

A matrix ``W`` of shape ``[rows, cols]`` is split into groups of ``G``
consecutive columns (``G`` must divide ``cols``; ``g = c // G``).

Base (width ``b1``): group-wise asymmetric round-to-nearest::

    s[r, g]  = (max W[r, group g] - min W[r, group g]) / (2**b1 - 1)   (float16)
    z[r, g]  = -min W[r, group g] / s[r, g]                             (float16)
    q[r, c]  = clamp(round(W[r, c] / s + z), 0, 2**b1 - 1)
             = sum_{i < b1} 2**i * B_i[r, c]                  (B_i: binary base planes)

Residual planes ``j = 1 .. bk - b1``, each fitted to what the previous widths
leave over (``R_0 = W - s * (q - z)``, ``R_j = R_{j-1} - a_j * S_j``)::

    S_j[r, c] = +1 if R_{j-1}[r, c] >= 0 else -1              (stored as a bit P_j = (S_j + 1) / 2)
    a_j[r, g] = mean over the group of |R_{j-1}[r, c]|        (the least-squares optimal scale
                                                              for a sign plane), stored as the
                                                              nearest 4-bit code relative to s
                                                              (``plane_scales.py``)

Reconstruction at any width ``b`` in ``[b1, bk]``::

    W_b[r, c] = s[r, g] * (q[r, c] - z[r, g]) + sum_{j=1}^{b - b1} a_j[r, g] * (2 * P_j[r, c] - 1)

computed in float32 by :func:`dequantize`. A plane lowers the squared error of
its group by ``G * a_j * (2 m - a_j)`` (``m`` = mean ``|R_{j-1}|``), which is
``G * m**2`` at the least-squares scale and positive for every nonzero code (the
nearest code to ``m`` lies below ``2 m``); the zero code, for residuals below
``s * 2**-(j + 3)`` on average, leaves it as it is. So the error never grows
with width, and a width-``b`` view is exactly the ``[b1, b]`` quantization of
the same matrix: the first planes never depend on the later ones. The residual
fit uses the decoded (coded) scales, so the stored planes correct the coding
error of the earlier ones.
"""

from dataclasses import dataclass, replace

import torch

from vllm_d2moe.mwq.bitpack import pack_bits, unpack_bits
from vllm_d2moe.mwq.plane_scales import (
    RATIO_UNIT_LOG2,
    decode_plane_scales,
    encode_plane_scales,
    pack_codes,
    unpack_codes,
)

SCALE_DTYPE = torch.float16


class MWQError(ValueError):
    """A quantization option or an input tensor is not usable."""


@dataclass(frozen=True)
class MWQSpec:
    """Widths and grouping of an MWQ checkpoint."""

    min_bits: int = 2
    max_bits: int = 8
    group_size: int = 128

    def __post_init__(self):
        if not 1 <= self.min_bits <= self.max_bits <= 8:
            raise MWQError(
                f"bit-widths must satisfy 1 <= min_bits <= max_bits <= 8, "
                f"got min_bits={self.min_bits}, max_bits={self.max_bits}"
            )
        if self.group_size < 1:
            raise MWQError(f"group_size must be positive, got {self.group_size}")

    @property
    def widths(self) -> range:
        return range(self.min_bits, self.max_bits + 1)

    def check_width(self, bits: int, what: str = "bit-width") -> int:
        if bits not in self.widths:
            raise MWQError(
                f"{what} {bits} is outside this checkpoint's widths "
                f"[{self.min_bits}, {self.max_bits}]"
            )
        return bits

    def num_groups(self, cols: int, name: str = "weight") -> int:
        if cols % self.group_size:
            raise MWQError(
                f"{name}: group size {self.group_size} does not divide its input "
                f"dimension {cols}; choose a group size that divides {cols}"
            )
        return cols // self.group_size


@dataclass(frozen=True)
class MWQTensor:
    """One quantized matrix, possibly truncated to a width below the stored maximum.

    ``base_bits``: uint8 ``[min_bits, rows, ceil(cols/8)]`` (bit plane ``i`` of ``q``);
    ``base_scale`` / ``base_zero``: float16 ``[rows, groups]``;
    ``planes``: one ``(bits uint8 [rows, ceil(cols/8)], scale codes uint8 [rows, ceil(groups/2)])``
    pair per residual plane, in order (codes: ``plane_scales.py``).
    """

    shape: tuple[int, int]
    group_size: int
    base_bits: torch.Tensor
    base_scale: torch.Tensor
    base_zero: torch.Tensor
    planes: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def min_bits(self) -> int:
        return self.base_bits.shape[0]

    @property
    def bits(self) -> int:
        return self.min_bits + len(self.planes)

    def truncate(self, bits: int) -> "MWQTensor":
        """The width-``bits`` view (no copy)."""
        if not self.min_bits <= bits <= self.bits:
            raise MWQError(f"width {bits} is outside [{self.min_bits}, {self.bits}]")
        return replace(self, planes=self.planes[: bits - self.min_bits])

    def map_tensors(self, fn) -> "MWQTensor":
        """The same tensor with ``fn`` applied to every stored array (copy, move, ...)."""
        return replace(
            self,
            base_bits=fn(self.base_bits),
            base_scale=fn(self.base_scale),
            base_zero=fn(self.base_zero),
            planes=tuple((fn(b), fn(s)) for b, s in self.planes),
        )

    @property
    def nbytes(self) -> int:
        tensors = [self.base_bits, self.base_scale, self.base_zero]
        tensors += [t for plane in self.planes for t in plane]
        return sum(t.numel() * t.element_size() for t in tensors)


def _check_matrix(weight: torch.Tensor, spec: MWQSpec, name: str, finite: bool = True) -> int:
    """The number of groups per row of ``weight``; raises for unusable input."""
    if weight.dim() != 2:
        raise MWQError(f"{name}: expected a 2-D matrix, got shape {tuple(weight.shape)}")
    if finite and not torch.isfinite(weight).all():
        raise MWQError(f"{name}: contains NaN or infinite values")
    return spec.num_groups(weight.shape[1], name)


def _scale_and_zero(
    lo: torch.Tensor, hi: torch.Tensor, levels: int, name: str, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float16 scale and zero of groups with float64 minima ``lo`` and maxima ``hi``.

    Both quantizers call this, so their scales and zeros are identical by construction.
    """
    scale = ((hi - lo) / levels).to(SCALE_DTYPE)
    # A constant group has no range: any positive scale reconstructs it via the zero.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = (-lo / scale.double()).to(SCALE_DTYPE)
    bad = ~(torch.isfinite(scale) & torch.isfinite(zero))
    if bad.any():
        flat = int(bad.flatten().nonzero()[0])
        row, group = divmod(flat, groups)
        raise MWQError(
            f"{name}: group {group} of row {row} spans [{lo.flatten()[flat]:.6g}, "
            f"{hi.flatten()[flat]:.6g}], whose scale or zero point overflows float16"
        )
    return scale, zero


def nearest_base(
    w: torch.Tensor, bits: int, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The round-to-nearest base of float64 groups ``w [rows, groups, G]``: codes uint8
    ``[rows, groups, G]``, float16 scale and zero ``[rows, groups]``."""
    levels = (1 << bits) - 1
    scale, zero = _scale_and_zero(w.amin(-1), w.amax(-1), levels, name, w.shape[-2])
    q = torch.round(w / scale.double().unsqueeze(-1) + zero.double().unsqueeze(-1))
    return torch.clamp(q, 0, levels).to(torch.uint8), scale, zero


def base_values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float64 ``s (q - z)`` of base codes ``q [..., groups, G]``."""
    return scale.double().unsqueeze(-1) * (q.double() - zero.double().unsqueeze(-1))


def nearest_plane(
    residual: torch.Tensor, scale: torch.Tensor, plane: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual plane ``plane`` (0-based) fitted to float64 residuals ``[..., groups, G]`` as the
    module docstring says: its bits (bool, the residual's signs), unpacked scale codes
    ``[..., groups]`` and the float64 values it adds."""
    positive = residual >= 0
    codes, alpha = encode_plane_scales(residual.abs().mean(-1), scale, plane)
    alpha = alpha.unsqueeze(-1)
    return positive, codes, torch.where(positive, alpha, -alpha)


def quantize(weight: torch.Tensor, spec: MWQSpec, name: str = "weight") -> MWQTensor:
    """Quantize a 2-D weight ``[rows, cols]`` (any float dtype) to MWQ widths ``spec.widths``.

    The float64 reference: :func:`quantize_float32` produces the same bytes faster.
    """
    groups = _check_matrix(weight, spec, name)
    rows, cols = weight.shape
    w = weight.detach().to(torch.float64).reshape(rows, groups, spec.group_size)

    q, scale, zero = nearest_base(w, spec.min_bits, name)
    residual = w - base_values(q, scale, zero)

    q = q.reshape(rows, cols)
    base_bits = torch.stack([pack_bits((q >> i) & 1) for i in range(spec.min_bits)])

    planes = []
    for j in range(spec.max_bits - spec.min_bits):
        positive, codes, added = nearest_plane(residual, scale, j)
        residual = residual - added
        planes.append((pack_bits(positive.reshape(rows, cols)), pack_codes(codes)))

    return MWQTensor(
        shape=(rows, cols),
        group_size=spec.group_size,
        base_bits=base_bits,
        base_scale=scale,
        base_zero=zero,
        planes=tuple(planes),
    )


# --- float32 quantization, byte-identical to the float64 reference ---------------------
#
# quantize_float32 runs the reference's arithmetic in float32 on cache-sized blocks of
# groups (rows of [groups, group_size]; reductions halve rows pairwise, packing is one
# matrix-vector product per plane). It proves, per group, that its float32 decisions
# equal the float64 ones, and hands every group it cannot prove (about 1% of normally
# distributed bf16 weights) to the float64 reference, so the output equals the
# reference's byte for byte:
#
# * rounding t = w / s + z: float32 is within 2U (2 max|w| / s + |z|) of float64
#   (U = 2**-24, the float32 unit roundoff); the group is proven when no element's t
#   lies that close to a rounding boundary k + 1/2.
# * the residuals r_0 = w + (s z - s q) and r_j = r_{j-1} - copysign(a_j, r_{j-1}):
#   every value computed is a multiple of the smallest unit in last place (ulp) among
#   the group's nonzero weights, s, s z (the exact product of two float16) and the a_j
#   (coded: multiples of ulp(s) 2**(RATIO_UNIT_LOG2 - j - 2)), and none exceeds
#   M = s max(|z|, |levels - z|, max|t - q|), nor max(|r_{j-1}| - a_j, a_j) for r_j
#   (tracked plane by plane). When M < 2**24 ulp, all of them are
#   float32 numbers: float32 and float64 compute the same exact residuals, hence the same
#   signs (r_0 is formed as w + (...) so that it is never -0.0, for which copysign and
#   the reference's r >= 0 would disagree).
# * a_j = the code nearest to mean |r_{j-1}|: summed pairwise over 8 in float32, then in
#   float64. When 8 M < 2**24 ulp the sum is exact, as is the reference's: the same mean.
#   Else the float32 sum is within 3U of it, and the group is proven when both ends of
#   mean (1 -+ 4U) get the same code (the nearest code is monotone in the mean).

_U = 2.0**-24
# Multiples of a unit up to 2**24 of it are float32 numbers; the margin covers the float64
# rounding of the bounds compared with it.
_LOG2_FLOAT32_INTEGERS = 24 - 0.01
# Float32 elements per block: a block's working set (a few arrays of the block's size)
# stays in cache, and each torch call still has enough work to split across threads.
_BLOCK_ELEMENTS = 1 << 19
# Explicit mantissa bits of the source dtypes quantize_float32 takes, and the log2 ulp of
# their subnormals.
_MANTISSA_BITS = {torch.bfloat16: (7, -133), torch.float16: (10, -24)}
# Adding then subtracting 1.5 * 2**23 rounds a float32 of magnitude below 2**22 to the
# nearest integer, ties to even (as torch.round, which is several times slower).
_ROUNDING_MAGIC = 1.5 * 2**23


def _log2_ulp(x: torch.Tensor, mantissa_bits: int, min_log2: int) -> torch.Tensor:
    """log2 of the unit in last place of ``x >= 0`` (float64) in a format with
    ``mantissa_bits`` explicit bits; +inf where x is 0 or infinite (no constraint)."""
    _, exponent = torch.frexp(x)
    ulp = torch.clamp(exponent.double() - 1 - mantissa_bits, min=min_log2)
    return torch.where((x > 0) & torch.isfinite(x), ulp, torch.full_like(ulp, float("inf")))


# 2**i for the i-th of 8 bits: ``bits.view(-1, 8) @ it`` packs bits into bytes,
# least-significant bit first (each sum has 8 terms: exact in any order).
_BIT_VALUES = torch.tensor([float(1 << i) for i in range(8)])


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """``bits`` {0,1} float32 ``[n, G]`` -> packed uint8 ``[n, G // 8]``, as :func:`pack_bits`."""
    n, g = bits.shape
    return torch.mv(bits.view(-1, 8), _BIT_VALUES).view(n, g // 8).to(torch.uint8)


class _Float32Block:
    """One block of groups (rows of ``w``, float32 ``[n, G]``, overwritten) quantized in
    float32, with the groups it could not prove equal to the reference (``undecided``)."""

    def __init__(
        self,
        w: torch.Tensor,
        spec: MWQSpec,
        name: str,
        source_dtype: torch.dtype,
        first_group: int,
        groups_per_row: int,
    ):
        levels = (1 << spec.min_bits) - 1
        lo, hi = w.amin(1).double(), w.amax(1).double()
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise MWQError(f"{name}: contains NaN or infinite values")
        scale, zero = _scale_and_zero(lo, hi, levels, name, groups_per_row)
        self.scale, self.zero = scale, zero
        s64, z64 = scale.double(), zero.double()
        s, z = scale.float().view(-1, 1), zero.float().view(-1, 1)
        work = torch.empty_like(w)

        # log2 of the unit every residual is a multiple of (see above), and bounds on |r_j|.
        magnitude = torch.abs(w, out=work)
        smallest_weight = magnitude.amin(1)
        with_zero = (smallest_weight == 0).nonzero().flatten()
        if len(with_zero):
            groups = magnitude[with_zero]
            smallest_weight[with_zero] = groups.masked_fill_(groups == 0, float("inf")).amin(1)
        mantissa_bits, min_log2 = _MANTISSA_BITS[source_dtype]
        log2_unit = torch.minimum(
            _log2_ulp(smallest_weight.double(), mantissa_bits, min_log2),
            _log2_ulp(s64, 10, -24) + torch.clamp(_log2_ulp(z64.abs(), 10, -24), max=0),
        )
        largest_sz_sq = s64 * torch.maximum(z64.abs(), (levels - z64).abs())
        largest = s64 * torch.stack([lo / s64 + z64, hi / s64 + z64 - levels]).abs().amax(0)
        largest = torch.clamp(largest, min=s64 * (0.5 + 2**-20))
        inexact = (
            torch.log2(torch.maximum(largest_sz_sq, largest)) >= _LOG2_FLOAT32_INTEGERS + log2_unit
        )

        t = torch.div(w, s, out=work).add_(z)
        # |t| <= max(|lo|, |hi|) / s + |z| < 2**22 (|z| and 3 / s are float16).
        q = torch.add(t, _ROUNDING_MAGIC).sub_(_ROUNDING_MAGIC)
        t -= q  # t - round(t), exact
        distance = torch.maximum(t.amax(1), -t.amin(1)).double()
        w_max = torch.maximum(lo.abs(), hi.abs())
        undecided = 0.5 - distance <= 2 * _U * (2 * w_max / s64 + z64.abs())
        q.clamp_(0, levels)
        q_bytes = q.to(torch.uint8)
        self.base_bits = [
            _pack_bits(torch.bitwise_right_shift(q_bytes, i).bitwise_and_(1).float())
            for i in range(spec.min_bits)
        ]
        del q_bytes

        # r_0 = w + (s z - s q): never -0.0 (see above). s z is exact: float16 times float16.
        residual = q.mul_(-s).add_(s * z).add_(w)
        del w
        g = spec.group_size
        self.planes = []
        planes = spec.max_bits - spec.min_bits
        log2_scale_ulp = _log2_ulp(s64, 10, -24)
        for j in range(planes):
            partial = torch.abs(residual, out=work)
            half = g // 2
            partial = partial[:, :half].add_(partial[:, half:])
            for _ in range(2):  # pairwise sums over 8 elements in all
                half //= 2
                partial = partial[:, :half].add_(partial[:, half : 2 * half])
            mean = partial.double().sum(1) / g
            codes, a64 = encode_plane_scales(mean, scale, j)
            sum_inexact = torch.log2(8 * largest) >= _LOG2_FLOAT32_INTEGERS + log2_unit
            slack = 4 * _U * mean
            coding_unproven = (
                encode_plane_scales(mean - slack, scale, j)[0] != encode_plane_scales(mean + slack, scale, j)[0]
            )
            undecided |= (sum_inexact & coding_unproven) | (a64 == 0)
            a = a64.float().view(-1, 1)
            signed = torch.copysign(a, residual, out=work)
            # (A coded scale has up to 17 significant bits: summing +-a * 2**i in float32, as
            # packing the signs directly would, is not exact.)
            self.planes.append((_pack_bits((signed > 0).float()), codes))
            if j + 1 < planes:
                residual -= signed
                log2_unit = torch.minimum(log2_unit, log2_scale_ulp + (RATIO_UNIT_LOG2 - j - 2))
                largest = torch.maximum(largest - a64, a64)
                inexact |= torch.log2(largest) >= _LOG2_FLOAT32_INTEGERS + log2_unit
        if planes:  # without planes the residuals are never formed
            undecided |= inexact
        self.undecided = undecided.nonzero().flatten() + first_group


def quantize_float32(
    weight: torch.Tensor, spec: MWQSpec, name: str = "weight", counts: dict | None = None
) -> MWQTensor:
    """:func:`quantize` computed in float32, with the same output bytes.

    Groups whose float32 result could differ from the float64 reference's (see the
    bounds above) are recomputed by the reference; ``counts``, when given, gains
    ``groups`` and ``recomputed`` (their numbers). Bit-packing by group requires a group
    size that is a multiple of 8; other group sizes (and float64 input) use the reference
    throughout.
    """
    if spec.group_size % 8 or weight.dtype not in _MANTISSA_BITS:
        return quantize(weight, spec, name)
    groups_per_row = _check_matrix(weight, spec, name, finite=False)  # blocks check that
    rows, cols = weight.shape
    g = spec.group_size
    total_groups = rows * groups_per_row
    grouped = weight.detach().reshape(total_groups, g)
    # Whole rows per block keep each block's packed output a contiguous row range.
    block_rows = max(1, _BLOCK_ELEMENTS // cols)
    packed_cols = cols // 8
    base_bits = torch.empty(spec.min_bits, rows, packed_cols, dtype=torch.uint8)
    scale = torch.empty(rows, groups_per_row, dtype=SCALE_DTYPE)
    zero = torch.empty(rows, groups_per_row, dtype=SCALE_DTYPE)
    planes_count = spec.max_bits - spec.min_bits
    plane_bits = torch.empty(planes_count, rows, packed_cols, dtype=torch.uint8)
    plane_codes = torch.empty(planes_count, rows, groups_per_row, dtype=torch.uint8)  # packed at the end
    undecided = []
    for row in range(0, rows, block_rows):
        n_rows = min(block_rows, rows - row)
        first, last = row * groups_per_row, (row + n_rows) * groups_per_row
        w = grouped[first:last].float()
        block = _Float32Block(w, spec, name, weight.dtype, first, groups_per_row)
        scale[row : row + n_rows] = block.scale.view(n_rows, groups_per_row)
        zero[row : row + n_rows] = block.zero.view(n_rows, groups_per_row)
        for i, bits in enumerate(block.base_bits):
            base_bits[i, row : row + n_rows] = bits.view(n_rows, packed_cols)
        for j, (bits, codes) in enumerate(block.planes):
            plane_bits[j, row : row + n_rows] = bits.view(n_rows, packed_cols)
            plane_codes[j, row : row + n_rows] = codes.view(n_rows, groups_per_row)
        undecided.append(block.undecided)

    undecided = torch.cat(undecided)
    if len(undecided):
        exact = quantize(grouped[undecided], MWQSpec(spec.min_bits, spec.max_bits, g), name)
        r, c = undecided // groups_per_row, undecided % groups_per_row
        byte_cols = (c * (g // 8)).unsqueeze(-1) + torch.arange(g // 8)
        rr = r.unsqueeze(-1)
        scale[r, c], zero[r, c] = exact.base_scale[:, 0], exact.base_zero[:, 0]
        for i in range(spec.min_bits):
            base_bits[i][rr, byte_cols] = exact.base_bits[i]
        for j, (bits, codes) in enumerate(exact.planes):
            plane_bits[j][rr, byte_cols] = bits
            plane_codes[j][r, c] = unpack_codes(codes, 1)[:, 0]
    if counts is not None:
        counts["groups"] = counts.get("groups", 0) + total_groups
        counts["recomputed"] = counts.get("recomputed", 0) + len(undecided)

    return MWQTensor(
        shape=(rows, cols),
        group_size=g,
        base_bits=base_bits,
        base_scale=scale,
        base_zero=zero,
        planes=tuple((plane_bits[j], pack_codes(plane_codes[j])) for j in range(planes_count)),
    )


def dequantize(t: MWQTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct ``W_b`` (``b = t.bits``) by the formula in the module docstring, in float32."""
    rows, cols = t.shape
    g = t.group_size
    q = torch.zeros(rows, cols, dtype=torch.float32, device=t.base_bits.device)
    for i in range(t.min_bits):
        q += unpack_bits(t.base_bits[i], cols).float() * (1 << i)
    w = (q.view(rows, -1, g) - t.base_zero.float().unsqueeze(-1)) * t.base_scale.float().unsqueeze(
        -1
    )
    groups = cols // g
    for j, (bits, codes) in enumerate(t.planes):
        sign = unpack_bits(bits, cols).float().view(rows, -1, g) * 2 - 1
        alpha = decode_plane_scales(unpack_codes(codes, groups), t.base_scale, j)
        w += alpha.unsqueeze(-1) * sign
    return w.view(rows, cols).to(dtype)
