"""Calibrated (activation-aware) MWQ: every width fitted to the layer's output error,
and none worse than round-to-nearest MWQ's.

Given a weight ``W [rows, cols]`` and the Hessian of its inputs ``H = X^T X``
(``X [tokens, cols]``: what the matrix multiplies in the source model), the
output error of an approximation ``Q`` is ``||X (W - Q)^T||^2 = tr((W - Q) H (W - Q)^T)``
(:func:`output_error`), a sum of independent per-row terms. MWQ's nesting stays
exact: the same format as :func:`vllm_d2moe.mwq.quantize.quantize`, width ``b``
one byte prefix. Each width is built on the one below it, and every row chooses
between two fits of the width's part (the base at ``min_bits``, then each
residual plane):

* round-to-nearest, exactly :func:`~vllm_d2moe.mwq.quantize.quantize`'s;
* calibrated: the base rounded GPTQ-style (columns in order, each group's float16
  scale and zero taken from its min/max when the sweep reaches it, each column's
  rounding error spread over the columns not yet rounded by the upper Cholesky
  factor of ``H^-1``, blocked by 128 columns); a plane ``j`` fitted to what the
  widths below leave, ``R = W - W_{b-1}``, its signs by the same sweep on the grid
  ``{-a, +a}`` (``a`` the group's mean ``|R|``), its scales, one per (row, group),
  by least squares on ``tr((R - a S) H (R - a S)^T)`` with the signs fixed (a
  negative scale flips its group's signs), stored as the nearest code
  (:func:`vllm_d2moe.mwq.plane_scales.encode_plane_scales`).

A row takes the calibrated fit only where it lowers that width's output error and
where continuing from it by round-to-nearest planes stays at or below round-to-nearest
MWQ's error at every wider width (the guard). So every width of every row, hence of
the matrix, has at most round-to-nearest MWQ's output error: a row that keeps the
round-to-nearest fit continues the very path an earlier choice was checked along.

Why the guard, and why it leaves little of GPTQ's gain below the widest widths:
plane ``j`` adds ``+-a_j`` with ``a_j`` within 0.5-1.5 times ``s 2**-(j+2)``, so the
planes above width ``b`` reach about half of width ``b``'s grid step around it
(three quarters with the largest codes). Round-to-nearest leaves every weight within
that reach. A calibrated fit takes the farther value for some weights (GPTQ's
compensation does, so that the errors cancel under ``H`` at its width); such a weight
stays out of reach of every wider width: an error floor, which the wider widths'
round-to-nearest error, halving per width, soon falls below (unguarded on the
reference model: 0.32x round-to-nearest's output error at width 2, 21x at width 8,
``benchmarks/accuracy/calibrated/output_error.md``). The guard keeps calibrated fits
where no wider width pays for them, mostly in the widest planes. ``guarded_up_to``
limits it to the widths up to one (the router's, say): those keep more of the gain,
and the wider widths may then lose against round-to-nearest MWQ, though never against
a round-to-nearest plane on the widths below them.

``H`` is damped before inversion by a share of its mean diagonal (:data:`DAMPING`,
:data:`NESTED_DAMPING`); an input no token reached has a zero row and column, gets
only the damping, and its columns are rounded without compensation. The sweeps are
float32, residuals and the scale solve float64; a leading batch dimension quantizes
several matrices of one shape (a layer's experts) at once.
"""

import torch

from vllm_d2moe.mwq.bitpack import pack_bits
from vllm_d2moe.mwq.plane_scales import encode_plane_scales, pack_codes
from vllm_d2moe.mwq.quantize import (
    MWQError,
    MWQSpec,
    MWQTensor,
    _scale_and_zero,
    base_values,
    nearest_base,
    nearest_plane,
)

# Damping of H as a share of its mean diagonal: GPTQ's 0.01 at a single width. With planes,
# 1.0 kept the most of the guarded fits in tests/test_calibrate.py's heavy-tailed problem
# (output error over round-to-nearest MWQ's at widths 2-8: 0.01: 1.00, 0.98, 0.90, 0.93,
# 0.82, 0.79, 0.77; 0.1: 1.00 ... 0.70; 1.0: 0.99, 0.97, 0.88, 0.88, 0.82, 0.78, 0.75; 10:
# 0.99 ... 0.85), and about as much as the others in its normal one.
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
    """Calibrated residual plane ``plane`` (0-based) fitted to ``residual`` (float64 ``[batch,
    rows, groups, G]``), as :func:`~vllm_d2moe.mwq.quantize.nearest_plane` returns it: bits,
    unpacked scale codes ``[batch, rows, groups]`` and the float64 values it adds."""
    batch, rows, groups, _ = residual.shape
    flat = residual.view(batch, rows, -1)

    def start_group(columns):
        return columns.abs().mean(-1)

    def round_column(alpha, column):
        positive = column >= 0
        return positive.to(torch.uint8), torch.where(positive, alpha, -alpha)

    positive, _ = _sweep(flat.float(), factor, group_size, start_group, round_column)
    signs = positive.float() * 2 - 1
    alpha = _least_squares_scales(flat.float(), signs, hessian, group_size)
    flip = (alpha < 0).repeat_interleave(group_size, -1)  # -a S = a (-S): store -S and |a|
    positive = (positive.bool() ^ flip).view(residual.shape)
    codes, decoded = encode_plane_scales(alpha.abs(), base_scale, plane)
    return positive, codes, decoded.unsqueeze(-1) * (positive.double() * 2 - 1)


# A row takes a calibrated fit only when its float32-evaluated errors are below the
# round-to-nearest ones by this share: the evaluation's rounding error is orders of magnitude smaller,
# so the guard holds for the exact (float64) objective.
GUARD_MARGIN = 1e-4


class _Objective:
    """Per-row output errors ``r H r^T`` of residuals (float32 products, float64 sums; ``H``
    normalised to a unit mean diagonal, which scales every error of a matrix alike)."""

    def __init__(self, hessian: torch.Tensor):
        h = hessian.double()
        self.hessian = (h / h.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]).float()

    def rows(self, residual: torch.Tensor) -> torch.Tensor:
        """float64 ``[batch, rows]`` of residuals ``[batch, rows, groups, G]``."""
        r = residual.flatten(-2).float()
        return (torch.bmm(r, self.hessian) * r).sum(-1, dtype=torch.float64)

    def picked(self, residual: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """float64 ``[n]`` of rows ``[n, groups, G]`` of the matrices ``matrix [n]``."""
        r = residual.flatten(-2).float()
        errors = torch.empty(len(r), dtype=torch.float64)
        for e in matrix.unique().tolist():
            mine = (matrix == e).nonzero().flatten()
            errors[mine] = ((r[mine] @ self.hessian[e]) * r[mine]).sum(-1, dtype=torch.float64)
        return errors


def _guarded(
    objective: _Objective,
    candidate: torch.Tensor,
    kept_errors: torch.Tensor,
    bounds: list[torch.Tensor],
    base_scale: torch.Tensor,
    next_plane: int,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Rows (bool ``[batch, rows]``) that take the residual ``candidate`` a calibrated fit
    leaves rather than the round-to-nearest fit's (whose errors are ``kept_errors``): a
    lower output error at this width, and at most round-to-nearest MWQ's (``bounds``, this
    width's first) at every wider width when continued from it by round-to-nearest planes
    ``next_plane, ...``. Also the errors of that continuation by width, this width's first
    (valid in the rows taken)."""
    below = 1 - GUARD_MARGIN
    errors = [objective.rows(candidate)]
    take = (errors[0] <= below * kept_errors) & (errors[0] <= below * bounds[0])
    if len(bounds) == 1 or not take.any():
        return take, errors
    index = take.nonzero(as_tuple=True)  # the rows still in, compacted: (matrix, row)
    later = torch.stack([b[index] for b in bounds[1:]])
    planes = range(next_plane, next_plane + len(later))
    scales = base_scale[index]

    # The widest width first, for every row: where a calibrated fit loses most often.
    residual = candidate[index]
    for plane in planes:
        residual = residual - nearest_plane(residual, scales, plane)[2]
    continued = torch.zeros_like(later)
    continued[-1] = objective.picked(residual, index[0])
    kept = continued[-1] <= below * later[-1]
    # Then the widths between, for the rows still in.
    rows = kept.nonzero().flatten()
    residual = candidate[index][rows]
    for k, plane in enumerate(planes[:-1]):
        if not len(rows):
            break
        residual = residual - nearest_plane(residual, scales[rows], plane)[2]
        continued[k, rows] = objective.picked(residual, index[0][rows])
        ok = continued[k, rows] <= below * later[k, rows]
        kept[rows[~ok]] = False
        rows, residual = rows[ok], residual[ok]
    take[index] = kept
    errors += [torch.zeros_like(errors[0]).index_put_(index, c) for c in continued]
    return take, errors


def _take(rows: torch.Tensor, calibrated: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
    """Per row (``rows`` bool ``[batch, rows]``) the calibrated or the round-to-nearest tensor."""
    mask = rows.view(*rows.shape, *[1] * (calibrated.dim() - rows.dim()))
    return torch.where(mask, calibrated, nearest)


def calibrated_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: MWQSpec,
    name: str = "weight",
    damping: float | None = None,
    guarded_up_to: int | None = None,
) -> list[MWQTensor]:
    """Quantize ``weight`` (``[rows, cols]`` or a batch ``[n, rows, cols]``, any float dtype)
    to MWQ widths ``spec.widths``, fitted to the output error under ``hessian``
    (``[cols, cols]`` or ``[n, cols, cols]``, ``X^T X`` of the calibration inputs; its
    scale does not matter), each width's at most round-to-nearest MWQ's. ``damping``:
    share of H's mean diagonal added to it (default :data:`NESTED_DAMPING` with residual
    planes, :data:`DAMPING` for one width). ``guarded_up_to``: the widest width the guard
    keeps at or below round-to-nearest MWQ's error (default: every width); a wider width
    takes a row's calibrated plane wherever it lowers that width's error given the widths
    below. Returns one :class:`MWQTensor` per matrix."""
    w = weight.detach().unsqueeze(0) if weight.dim() == 2 else weight.detach()
    h = hessian.unsqueeze(0) if hessian.dim() == 2 else hessian
    if w.dim() != 3:
        raise MWQError(f"{name}: expected a matrix or a batch of them, got shape {tuple(weight.shape)}")
    batch, rows, cols = w.shape
    groups = spec.num_groups(cols, name)
    if tuple(h.shape) != (batch, cols, cols):
        raise MWQError(
            f"{name}: the Hessian has shape {tuple(hessian.shape)}; weights "
            f"{tuple(weight.shape)} need {(batch, cols, cols) if weight.dim() == 3 else (cols, cols)}"
        )
    if not torch.isfinite(w).all():
        raise MWQError(f"{name}: contains NaN or infinite values")
    planes = spec.max_bits - spec.min_bits
    top = spec.max_bits if guarded_up_to is None else spec.check_width(guarded_up_to, "guarded_up_to")
    guarded = top - spec.min_bits
    if damping is None:
        damping = NESTED_DAMPING if planes else DAMPING
    if not damping > 0:
        raise MWQError(f"{name}: damping must be positive, got {damping}")
    factor = _inverse_factor(h, name, damping)
    objective = _Objective(h)
    g = spec.group_size
    grouped = w.double().view(batch, rows, groups, g)

    # Round-to-nearest MWQ and its per-row errors at the guarded widths: the guard's bounds.
    codes, scale, zero = (
        t.view(batch, rows, *t.shape[1:])
        for t in nearest_base(grouped.view(batch * rows, groups, g), spec.min_bits, name)
    )
    residual = grouped - base_values(codes, scale, zero)
    bounds = [objective.rows(residual)]
    path = residual
    for j in range(guarded):
        path = path - nearest_plane(path, scale, j)[2]
        bounds.append(objective.rows(path))
    del path
    # Per row and guarded width, the errors of continuing the chosen fits by round-to-nearest.
    continued = list(bounds)

    def calibrated_rows(level: int, candidate: torch.Tensor, kept: torch.Tensor, base_scale: torch.Tensor):
        """Rows taking the calibrated fit of width ``min_bits + level`` (which leaves
        ``candidate``) over the round-to-nearest one (which leaves ``kept``)."""
        if level > guarded:
            return objective.rows(candidate) <= (1 - GUARD_MARGIN) * objective.rows(kept)
        take, errors = _guarded(objective, candidate, continued[level], bounds[level:], base_scale, level)
        continued[level : level + len(errors)] = [_take(take, e, c) for e, c in zip(errors, continued[level:])]
        return take

    calibrated_codes, calibrated_scale, calibrated_zero = _fit_base(w, factor, spec, name)
    calibrated_codes = calibrated_codes.view(codes.shape)
    candidate = grouped - base_values(calibrated_codes, calibrated_scale, calibrated_zero)
    take = calibrated_rows(0, candidate, residual, calibrated_scale)
    codes = _take(take, calibrated_codes, codes)
    scale, zero = _take(take, calibrated_scale, scale), _take(take, calibrated_zero, zero)
    residual = _take(take, candidate, residual)

    fitted = []
    for j in range(planes):
        nearest = nearest_plane(residual, scale, j)
        calibrated = _fit_plane(residual, factor, objective.hessian, g, scale, j)
        candidate, kept = residual - calibrated[2], residual - nearest[2]
        take = calibrated_rows(j + 1, candidate, kept, scale)
        positive, plane_codes = (_take(take, c, n) for c, n in zip(calibrated[:2], nearest[:2]))
        residual = _take(take, candidate, kept)
        fitted.append((positive.view(batch, rows, cols), pack_codes(plane_codes)))
    codes = codes.view(batch, rows, cols)
    return [
        MWQTensor(
            shape=(rows, cols),
            group_size=g,
            base_bits=torch.stack([pack_bits((codes[e] >> i) & 1) for i in range(spec.min_bits)]),
            base_scale=scale[e].contiguous(),
            base_zero=zero[e].contiguous(),
            planes=tuple((pack_bits(p[e]), c[e].contiguous()) for p, c in fitted),
        )
        for e in range(batch)
    ]
