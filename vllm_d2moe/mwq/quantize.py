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
    a_j[r, g] = mean over the group of |R_{j-1}[r, c]|        (float16; the least-squares
                                                              optimal scale for a sign plane)

Reconstruction at any width ``b`` in ``[b1, bk]``::

    W_b[r, c] = s[r, g] * (q[r, c] - z[r, g]) + sum_{j=1}^{b - b1} a_j[r, g] * (2 * P_j[r, c] - 1)

computed in float32 by :func:`dequantize`. Every plane lowers the squared
error of its group by ``G * a_j**2`` (> 0 unless the residual is zero), so the
error strictly decreases with width, and a width-``b`` view is exactly the
``[b1, b]`` quantization of the same matrix: the first planes never depend on
the later ones. The residual fit uses the float16-rounded scales, so the
stored planes correct the rounding of the earlier ones.
"""

from dataclasses import dataclass, replace

import torch

from vllm_d2moe.mwq.bitpack import pack_bits, unpack_bits

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
    ``planes``: one ``(bits uint8 [rows, ceil(cols/8)], scale float16 [rows, groups])``
    pair per residual plane, in order.
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

    def narrow_rows(self, start: int, length: int) -> "MWQTensor":
        """Rows ``start .. start+length`` (tensor-parallel slice of an output dimension)."""
        return MWQTensor(
            shape=(length, self.shape[1]),
            group_size=self.group_size,
            base_bits=self.base_bits[:, start : start + length],
            base_scale=self.base_scale[start : start + length],
            base_zero=self.base_zero[start : start + length],
            planes=tuple(
                (b[start : start + length], s[start : start + length]) for b, s in self.planes
            ),
        )

    def narrow_cols(self, start: int, length: int) -> "MWQTensor":
        """Columns ``start .. start+length`` (tensor-parallel slice of the input dimension).

        The slice must keep whole groups and whole packed bytes.
        """
        g = self.group_size
        if start % g or length % g or start % 8 or length % 8:
            raise MWQError(
                f"cannot split the input dimension {self.shape[1]} at [{start}, "
                f"{start + length}): the split must fall on group ({g}) and byte boundaries"
            )
        bytes_ = slice(start // 8, (start + length) // 8)
        groups = slice(start // g, (start + length) // g)
        return MWQTensor(
            shape=(self.shape[0], length),
            group_size=g,
            base_bits=self.base_bits[:, :, bytes_],
            base_scale=self.base_scale[:, groups],
            base_zero=self.base_zero[:, groups],
            planes=tuple((b[:, bytes_], s[:, groups]) for b, s in self.planes),
        )

    def map_tensors(self, fn) -> "MWQTensor":
        """The same tensor with ``fn`` applied to every stored array (copy, move, ...)."""
        return replace(
            self,
            base_bits=fn(self.base_bits),
            base_scale=fn(self.base_scale),
            base_zero=fn(self.base_zero),
            planes=tuple((fn(b), fn(s)) for b, s in self.planes),
        )

    @staticmethod
    def cat_rows(top: "MWQTensor", bottom: "MWQTensor") -> "MWQTensor":
        """Stack two quantized matrices with equal columns and widths (e.g. gate over up)."""
        if top.shape[1] != bottom.shape[1] or top.bits != bottom.bits:
            raise MWQError(f"cannot stack {top.shape}@{top.bits}b over {bottom.shape}@{bottom.bits}b")
        return MWQTensor(
            shape=(top.shape[0] + bottom.shape[0], top.shape[1]),
            group_size=top.group_size,
            base_bits=torch.cat([top.base_bits, bottom.base_bits], dim=1),
            base_scale=torch.cat([top.base_scale, bottom.base_scale]),
            base_zero=torch.cat([top.base_zero, bottom.base_zero]),
            planes=tuple(
                (torch.cat([tb, bb]), torch.cat([ts, bs]))
                for (tb, ts), (bb, bs) in zip(top.planes, bottom.planes)
            ),
        )

    @property
    def nbytes(self) -> int:
        tensors = [self.base_bits, self.base_scale, self.base_zero]
        tensors += [t for plane in self.planes for t in plane]
        return sum(t.numel() * t.element_size() for t in tensors)


def quantize(weight: torch.Tensor, spec: MWQSpec, name: str = "weight") -> MWQTensor:
    """Quantize a 2-D weight ``[rows, cols]`` (any float dtype) to MWQ widths ``spec.widths``."""
    if weight.dim() != 2:
        raise MWQError(f"{name}: expected a 2-D matrix, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise MWQError(f"{name}: contains NaN or infinite values")
    rows, cols = weight.shape
    groups = spec.num_groups(cols, name)
    w = weight.detach().to(torch.float64).reshape(rows, groups, spec.group_size)

    lo, hi = w.amin(-1), w.amax(-1)
    levels = (1 << spec.min_bits) - 1
    scale = ((hi - lo) / levels).to(SCALE_DTYPE)
    # A constant group has no range: any positive scale reconstructs it via the zero.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale64 = scale.double().unsqueeze(-1)
    zero = (-lo / scale64.squeeze(-1)).to(SCALE_DTYPE)
    zero64 = zero.double().unsqueeze(-1)
    q = torch.clamp(torch.round(w / scale64 + zero64), 0, levels).to(torch.uint8)
    residual = w - scale64 * (q.double() - zero64)

    q = q.reshape(rows, cols)
    base_bits = torch.stack([pack_bits((q >> i) & 1) for i in range(spec.min_bits)])

    planes = []
    for _ in range(spec.max_bits - spec.min_bits):
        positive = residual >= 0
        alpha = residual.abs().mean(-1).to(SCALE_DTYPE)
        residual = residual - alpha.double().unsqueeze(-1) * (positive.double() * 2 - 1)
        planes.append((pack_bits(positive.reshape(rows, cols)), alpha))

    return MWQTensor(
        shape=(rows, cols),
        group_size=spec.group_size,
        base_bits=base_bits,
        base_scale=scale,
        base_zero=zero,
        planes=tuple(planes),
    )


def dequantize(t: MWQTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct ``W_b`` (``b = t.bits``) by the formula in the module docstring, in float32."""
    rows, cols = t.shape
    g = t.group_size
    q = torch.zeros(rows, cols, dtype=torch.float32, device=t.base_bits.device)
    for i in range(t.min_bits):
        q += unpack_bits(t.base_bits[i], cols).float() * (1 << i)
    w = (q.view(rows, -1, g) - t.base_zero.float().unsqueeze(-1)) * t.base_scale.float().unsqueeze(-1)
    for bits, alpha in t.planes:
        sign = unpack_bits(bits, cols).float().view(rows, -1, g) * 2 - 1
        w += alpha.float().unsqueeze(-1) * sign
    return w.view(rows, cols).to(dtype)
