"""From width scores to widths: per-width capacities and the target-bits shift.

Both the serving path and the trainer use these, so that training sees the
same assignment rule as serving.

Capacities (the paper's c_k): in one batch of N (token, expert) pairs at most
``ceil(c_k * N)`` pairs get width k, so the count never exceeds ``c_k * N`` by
a whole pair or more. Pairs are placed greedily by preference rank: first every
pair's favourite width, the highest-scoring pairs winning where a width
overflows; the pairs left over then try their second choice, and so on.

Target bits: lowering every logit k by ``shift * b_k`` moves choices towards
narrower widths as ``shift`` grows; the router file records the average width
this gives on the calibration tokens for a range of shifts, and a target
average is met by interpolating that curve.
"""

import bisect
import math
from collections.abc import Sequence

import torch


def check_capacities(capacities: Sequence[float], num_widths: int, what: str = "capacities") -> tuple[float, ...]:
    """Validated capacities: one fraction in [0, 1] per width, summing to at least 1."""
    capacities = tuple(float(c) for c in capacities)
    if len(capacities) != num_widths:
        raise ValueError(f"{what}: {len(capacities)} values for {num_widths} widths")
    if any(not 0.0 <= c <= 1.0 for c in capacities):
        raise ValueError(f"{what}: every capacity must be in [0, 1], got {list(capacities)}")
    if sum(capacities) < 1.0 - 1e-6:
        raise ValueError(f"{what}: {list(capacities)} sum to {sum(capacities):.3f} < 1, so some pairs "
                         f"could get no width")
    return capacities


def capacity_limits(capacities: Sequence[float], num_pairs: int) -> list[int]:
    """Most pairs each width may take in a batch of ``num_pairs``."""
    # The epsilon keeps float error (0.3 * 10 = 3.0000000000000004) from adding a slot.
    return [math.ceil(c * num_pairs - 1e-9) for c in capacities]


def assign_with_capacities(scores: torch.Tensor, capacities: Sequence[float]) -> torch.Tensor:
    """Width index ``[N]`` for ``scores [N, K]`` (higher is preferred) under per-width capacities."""
    num_pairs, num_widths = scores.shape
    remaining = capacity_limits(capacities, num_pairs)
    choice = torch.full((num_pairs,), -1, dtype=torch.long, device=scores.device)
    preference = scores.argsort(dim=1, descending=True, stable=True)
    for rank in range(num_widths):
        wanted = preference[:, rank]
        for k in range(num_widths):
            candidates = ((choice < 0) & (wanted == k)).nonzero().squeeze(1)
            if candidates.numel() == 0 or remaining[k] == 0:
                continue
            if candidates.numel() > remaining[k]:
                best = scores[candidates, k].argsort(descending=True, stable=True)[: remaining[k]]
                candidates = candidates[best]
            choice[candidates] = k
            remaining[k] -= candidates.numel()
    return choice


def choose_widths(scores: torch.Tensor, capacities: Sequence[float] | None) -> torch.Tensor:
    """Width index per pair: the favourite, or the capacity-constrained assignment."""
    if capacities is None:
        return scores.argmax(dim=1)
    return assign_with_capacities(scores, capacities)


def shift_scores(scores: torch.Tensor, widths: Sequence[int], shift: torch.Tensor | float) -> torch.Tensor:
    """``scores - shift * widths`` (``shift`` a scalar or one value per pair)."""
    bits = torch.tensor(widths, dtype=scores.dtype, device=scores.device)
    shift = torch.as_tensor(shift, dtype=scores.dtype, device=scores.device)
    return scores - shift.reshape(-1, 1) * bits if shift.dim() else scores - shift * bits


def shift_for_target(calibration: Sequence[tuple[float, float]], target_bits: float) -> float:
    """The shift whose calibrated average width is ``target_bits`` (linear interpolation).

    ``calibration`` is ``(shift, average width)`` with shift ascending (average
    descending). Targets beyond the calibrated range are an error naming it.
    """
    if not calibration:
        raise ValueError("this router has no target-bits calibration; retrain it with `d2moe train-router`")
    shifts = [s for s, _ in calibration]
    averages = [a for _, a in calibration]
    low, high = min(averages), max(averages)
    if not low - 1e-9 <= target_bits <= high + 1e-9:
        raise ValueError(f"target_bits {target_bits} is outside the router's calibrated range "
                         f"[{low:.3f}, {high:.3f}]")
    # Averages fall as the shift grows: search the reversed (ascending) list.
    rising = averages[::-1]
    i = bisect.bisect_left(rising, target_bits)
    if i == 0:
        return shifts[-1]
    if i == len(rising):
        return shifts[0]
    a0, a1 = rising[i - 1], rising[i]
    s0, s1 = shifts[len(shifts) - i], shifts[len(shifts) - 1 - i]
    return s1 if a1 == a0 else s0 + (s1 - s0) * (target_bits - a0) / (a1 - a0)
