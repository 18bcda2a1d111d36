"""Calibrated (activation-aware) MWQ: every width fitted to the layer's output error.

Given a weight ``W [rows, cols]`` and the Hessian of its inputs ``H = X^T X``
(``X [tokens, cols]``: what the matrix multiplies in the source model), the
output error of an approximation ``Q`` is ``||X (W - Q)^T||^2 = tr((W - Q) H (W - Q)^T)``
(:func:`output_error`). MWQ's nesting stays exact: the same format as
:func:`vllm_d2moe.mwq.quantize.quantize`, width ``b`` one byte prefix, but

* the base (width ``min_bits``) is rounded GPTQ-style: columns in order, each
  group's float16 scale and zero taken from its min/max when the sweep reaches it,
  each column's rounding error spread over the columns not yet rounded by the
  upper Cholesky factor of ``H^-1`` (blocked: 128-column blocks, the rest updated
  once per block);
* each residual plane ``j`` fits ``R = W - W_{b-1}``, what the widths below leave:
  its signs by the same sweep on the grid ``{-a, +a}`` (``a`` the group's mean
  ``|R|`` when the sweep reaches it), then its scales, one per (row, group), by
  least squares on ``tr((R - a S) H (R - a S)^T)`` with the signs fixed (a joint
  ``groups x groups`` solve per row; a negative scale flips its group's signs),
  stored as the nearest code of the checkpoint format
  (:func:`vllm_d2moe.mwq.plane_scales.encode_plane_scales`, within 0.5-1.5 times
  ``s 2**-(j+2)``). The next plane fits what the decoded scales leave.

Nesting has a price here: GPTQ's compensation moves the base away from the
nearest grid point, so its residual spans more than the half step that sign
planes with halving scales can reach, and the widest widths lose against
round-to-nearest MWQ. ``H`` is damped before inversion by a share of its mean
diagonal: GPTQ's 1% at a single width, :data:`NESTED_DAMPING` with planes (a
trade between the lowest and the widest widths, see there); an input no token
reached has a zero row and column, gets only the damping, and its columns are
rounded without compensation. Work is float32 (float64 for the scale solve); a
leading batch dimension quantizes several matrices of one shape (a layer's
experts) in one sweep.
"""

import torch

from vllm_d2moe.mwq.bitpack import pack_bits
from vllm_d2moe.mwq.plane_scales import encode_plane_scales, pack_codes
from vllm_d2moe.mwq.quantize import MWQError, MWQSpec, MWQTensor, _scale_and_zero

# Damping of H as a share of its mean diagonal. GPTQ's 0.01 minimises the base's output
# error alone; more keeps the base nearer its grid, so the planes above it (whose scales
# halve from half a grid step) reach what it leaves. Measured on the reference model
# (gate_up of two experts, output error over round-to-nearest MWQ's at widths 2, 3, 4,
# 5, 8): 0.01: 0.11-0.30, 0.34-0.66, 1.1-1.7, 3.6-4.8, 143-164; 1.0: 0.22-0.40,
# 0.30-0.50, 0.54-0.79, 1.2-1.4, 22.
DAMPING = 0.01
NESTED_DAMPING = 1.0
BLOCK_COLUMNS = 128


def output_error(weight: torch.Tensor, approximation: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)`` in float64: the squared output error on the calibration inputs."""
    diff = weight.double() - approximation.double()
    return float(((diff @ hessian.double()) * diff).sum())


def _inverse_factor(hessian: torch.Tensor, name: str, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped ``H^-1`` (float32 ``[batch, cols, cols]``)."""
    h = hessian.double().clone()
    if not torch.isfinite(h).all():
        raise MWQError(f"{name}: the calibration Hessian contains NaN or infinite values")
    diagonal = h.diagonal(dim1=-2, dim2=-1)
    mean = diagonal.mean(-1, keepdim=True)
    if (mean <= 0).any():
        raise MWQError(f"{name}: the calibration Hessian is zero (no calibration input reached it)")
    diagonal[diagonal <= 0] = 1.0  # an unreached input: no coupling, only the damping's scale
    diagonal += damping * mean
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(inverse, upper=True).float()
    except torch.linalg.LinAlgError as e:
        raise MWQError(f"{name}: the calibration Hessian is not positive definite ({e})") from e


def _sweep(target: torch.Tensor, factor: torch.Tensor, group_size: int, start_group, round_column):
    """GPTQ's blocked sweep over the columns of ``target`` (float32 ``[batch, rows, cols]``,
    overwritten): ``start_group(columns)`` sees a group's current (compensated) columns
    when the sweep reaches it and returns its grid; ``round_column(grid, column)`` returns
    a column's code and value. Returns the codes ``[batch, rows, cols]`` and the grids."""
    cols = target.shape[-1]
    block = group_size * max(1, BLOCK_COLUMNS // group_size)
    codes = torch.empty(target.shape, dtype=torch.uint8)
    grids, grid = [], None
    for first in range(0, cols, block):
        last = min(first + block, cols)
        # columns as contiguous rows: the per-column updates are then dense
        w = target[..., first:last].transpose(-1, -2).contiguous()  # [batch, block, rows]
        u = factor[:, first:last, first:last]
        errors = torch.empty_like(w)
        for i in range(last - first):
            if (first + i) % group_size == 0:
                grid = start_group(w[:, i : i + group_size].transpose(-1, -2))
                grids.append(grid)
            code, value = round_column(grid, w[:, i])
            codes[..., first + i] = code
            error = (w[:, i] - value) / u[:, i, i].unsqueeze(-1)
            errors[:, i] = error
            w[:, i + 1 :].baddbmm_(u[:, i, i + 1 :].unsqueeze(-1), error.unsqueeze(1), alpha=-1)
        if last < cols:
            target[..., last:] -= torch.bmm(errors.transpose(-1, -2), factor[:, first:last, last:])
    return codes, grids


def _fit_base(weight: torch.Tensor, factor: torch.Tensor, spec: MWQSpec, name: str):
    """GPTQ rounding on min/max grids: codes ``[batch, rows, cols]``, float16 scale and zero
    ``[batch, rows, groups]``."""
    levels = (1 << spec.min_bits) - 1

    def start_group(columns):
        scale, zero = _scale_and_zero(
            columns.amin(-1).double(), columns.amax(-1).double(), levels, name, 1
        )
        return scale, zero, scale.float(), zero.float()

    def round_column(grid, column):
        _, _, s, z = grid
        q = torch.clamp(torch.round(column / s + z), 0, levels)
        return q.to(torch.uint8), s * (q - z)

    codes, grids = _sweep(weight.float().clone(), factor, spec.group_size, start_group, round_column)
    scale = torch.stack([g[0] for g in grids], -1)
    zero = torch.stack([g[1] for g in grids], -1)
    return codes, scale, zero


def _least_squares_scales(
    residual: torch.Tensor, signs: torch.Tensor, hessian: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Per (row, group) scales ``a`` minimising ``tr((R - a S) H (R - a S)^T)`` for fixed
    signs ``S`` (float32 ``[batch, rows, cols]``); float64 ``[batch, rows, groups]``."""
    batch, rows, cols = residual.shape
    groups = cols // group_size
    # normal equations per row: (M^T H M) a = M^T H r, with M the signs spread by group
    rhs = (torch.bmm(residual, hessian) * signs).view(batch, rows, groups, group_size).sum(-1)
    gram = torch.empty(batch, rows, groups, groups, dtype=torch.float64)
    for h in range(groups):  # gram is symmetric: groups g >= h from group h's columns
        cols_h, later = slice(h * group_size, (h + 1) * group_size), slice(h * group_size, cols)
        coupled = torch.bmm(signs[..., cols_h], hessian[:, cols_h, later])  # [batch, rows, cols - h G]
        column = (coupled * signs[..., later]).view(batch, rows, groups - h, group_size).sum(-1).double()
        gram[..., h:, h] = column
        gram[..., h, h:] = column
    # A tiny ridge keeps rows whose groups are all unreached solvable (their scale is 0).
    ridge = 1e-9 * gram.diagonal(dim1=-2, dim2=-1).abs().amax(-1, keepdim=True).clamp_min(1e-30)
    gram.diagonal(dim1=-2, dim2=-1).add_(ridge)
    return torch.linalg.solve(gram, rhs.double().unsqueeze(-1)).squeeze(-1)


def _fit_plane(
    residual: torch.Tensor,
    factor: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    base_scale: torch.Tensor,
    plane: int,
):
    """Residual plane ``plane`` (0-based) fitted to ``residual`` (float64 ``[batch, rows,
    cols]``): its {0,1} bits, packed scale codes and the float64 values it adds."""
    batch, rows, cols = residual.shape

    def start_group(columns):
        return columns.abs().mean(-1)

    def round_column(alpha, column):
        positive = column >= 0
        return positive.to(torch.uint8), torch.where(positive, alpha, -alpha)

    positive, _ = _sweep(residual.float(), factor, group_size, start_group, round_column)
    signs = positive.float() * 2 - 1
    alpha = _least_squares_scales(residual.float(), signs, hessian, group_size)
    flipped = alpha < 0  # -a S = a (-S): store the group's signs flipped and |a|
    if flipped.any():
        flip = flipped.repeat_interleave(group_size, -1)
        positive = torch.where(flip, 1 - positive, positive)
        signs = torch.where(flip, -signs, signs)
    codes, decoded = encode_plane_scales(alpha.abs(), base_scale, plane)
    added = decoded.repeat_interleave(group_size, -1) * signs.double()
    return positive, pack_codes(codes), added


def calibrated_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: MWQSpec,
    name: str = "weight",
    damping: float | None = None,
) -> list[MWQTensor]:
    """Quantize ``weight`` (``[rows, cols]`` or a batch ``[n, rows, cols]``, any float dtype)
    to MWQ widths ``spec.widths``, each fitted to the output error under ``hessian``
    (``[cols, cols]`` or ``[n, cols, cols]``, ``X^T X`` of the calibration inputs; its
    scale does not matter). ``damping``: share of H's mean diagonal added to it (default
    :data:`NESTED_DAMPING` with residual planes, :data:`DAMPING` for one width). Returns
    one :class:`MWQTensor` per matrix."""
    w = weight.detach().unsqueeze(0) if weight.dim() == 2 else weight.detach()
    h = hessian.unsqueeze(0) if hessian.dim() == 2 else hessian
    if w.dim() != 3:
        raise MWQError(f"{name}: expected a matrix or a batch of them, got shape {tuple(weight.shape)}")
    batch, rows, cols = w.shape
    spec.num_groups(cols, name)
    if tuple(h.shape) != (batch, cols, cols):
        raise MWQError(
            f"{name}: the Hessian has shape {tuple(hessian.shape)}; weights "
            f"{tuple(weight.shape)} need {(batch, cols, cols) if weight.dim() == 3 else (cols, cols)}"
        )
    if not torch.isfinite(w).all():
        raise MWQError(f"{name}: contains NaN or infinite values")
    if damping is None:
        damping = NESTED_DAMPING if spec.max_bits > spec.min_bits else DAMPING
    if not damping > 0:
        raise MWQError(f"{name}: damping must be positive, got {damping}")
    factor = _inverse_factor(h, name, damping)
    # Normalised so that float32 products stay in range whatever the token count.
    h32 = (h.double() / h.double().diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]).float()
    codes, scale, zero = _fit_base(w, factor, spec, name)
    g = spec.group_size
    base = scale.double().repeat_interleave(g, -1) * (codes.double() - zero.double().repeat_interleave(g, -1))
    residual = w.double() - base
    planes = []
    for j in range(spec.max_bits - spec.min_bits):
        positive, stored, added = _fit_plane(residual, factor, h32, g, scale, j)
        residual -= added
        planes.append((positive, stored))
    return [
        MWQTensor(
            shape=(rows, cols),
            group_size=g,
            base_bits=torch.stack([pack_bits((codes[e] >> i) & 1) for i in range(spec.min_bits)]),
            base_scale=scale[e].contiguous(),
            base_zero=zero[e].contiguous(),
            planes=tuple((pack_bits(p[e]), s[e].contiguous()) for p, s in planes),
        )
        for e in range(batch)
    ]
