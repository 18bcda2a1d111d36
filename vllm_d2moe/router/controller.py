"""The online width controller: one global shift of the router's scores, steered while serving.

Every pair that follows the server's policy is chosen by its own scores minus
``shift * b_k`` (:func:`vllm_d2moe.router.assign.shift_scores`); this module
moves that one ``shift`` between steps, so a pair's width never depends on the
other pairs of its batch, only on when it ran. It works in bits: it keeps a
*setpoint* (an average width) and turns it into a shift through the router's
calibration curve (:func:`~vllm_d2moe.router.assign.shift_for_target`), so its
reach is the calibrated range and its slew is in bits per second.

Two goals (options ``target_bits`` and ``slo``):

* ``target_bits`` alone: the running average width of the policy's pairs holds
  the target. The calibration was measured on other tokens than the ones
  served, so the setpoint is the target plus an integral of the measured error
  (each step's error weighted by how many pairs it counted).
* ``slo = {"tpot_ms": T}``: the average width is as high as the time per output
  token allows. The goal is on the p90 of the step time (what a decoding
  request waits per token), taken over the steps of the last ``WINDOW_S``: above
  ``HEADROOM * T`` the setpoint falls, below ``LOWER_BAND * HEADROOM * T`` it
  rises, in between it stays (the band keeps a width change's own effect on the
  step time from turning it back: no oscillation). Falling is faster than
  rising (a missed SLO costs more than a bit too low a width). ``target_bits``,
  if also given, is the ceiling.

Every change of the setpoint is bounded by ``MAX_FALL_BITS_PER_S`` /
``MAX_RISE_BITS_PER_S`` (SLO) or ``TARGET_BITS_PER_S`` times the time since the last step (at most
``MAX_STEP_GAP_S``, so an idle pause gives no jump). An SLO not met at the
lowest reachable width is logged (once per episode) with the reachable range.

No vLLM here: :mod:`vllm_d2moe.vllm_glue.width_control` feeds it the step times;
:class:`vllm_d2moe.width_selection.WidthSelector` feeds it the widths it chose.
"""

import logging
import math
import threading
from collections import deque
from collections.abc import Sequence

from vllm_d2moe.router.assign import shift_for_target

logger = logging.getLogger(__name__)

WINDOW_S = 2.0  # the p90 step time is over the steps of this last stretch (at least MIN_WINDOW_STEPS)
MIN_WINDOW_STEPS = 10
HEADROOM = 0.95  # aim the p90 step time this far under the SLO (what the engine loop adds besides)
LOWER_BAND = 0.96  # no rise while the p90 step time is above this share of the aim
MAX_FALL_BITS_PER_S = 1.0
MAX_RISE_BITS_PER_S = 0.25
TARGET_BITS_PER_S = 2.0  # target_bits alone: only calibration error to correct, both ways alike
MAX_STEP_GAP_S = 0.5
INTEGRAL_GAIN = 0.5  # target_bits: share of a step's error (at full weight) added to the correction
FULL_WEIGHT_PAIRS = 64  # a step counting this many pairs corrects at half the gain


class WidthController:
    """The shift for the next step from the steps so far (thread-safe; see the module docstring).

    ``calibration``: the router's ``(shift, average width)`` curve. ``tpot_ms``
    (the SLO) and/or ``target_bits``; at least one. ``now`` arguments are
    ``time.monotonic()`` seconds (given by the caller, so a simulation can run
    faster than real time).
    """

    def __init__(self, calibration: Sequence[tuple[float, float]], target_bits: float | None = None,
                 tpot_ms: float | None = None):
        if target_bits is None and tpot_ms is None:
            raise ValueError("WidthController needs target_bits or tpot_ms")
        if tpot_ms is not None and not tpot_ms > 0:
            raise ValueError(f"d2moe option 'slo': tpot_ms must be a positive number, got {tpot_ms!r}")
        averages = [a for _, a in calibration]
        if not averages:
            shift_for_target(calibration, 0.0)  # the "retrain it" error
        self.calibration = tuple(calibration)
        self.low, self.high = min(averages), max(averages)
        if target_bits is not None:
            shift_for_target(self.calibration, target_bits)  # outside the range: the error naming it
        self.target_bits = target_bits
        self.tpot_ms = tpot_ms
        self._lock = threading.Lock()
        self._setpoint = self.high if target_bits is None else target_bits
        self._correction = 0.0  # target_bits: integral of the measured error
        self._shift = shift_for_target(self.calibration, self._setpoint)
        self._step_pairs = [0] * 9  # pairs per bit value chosen under the policy since the last step
        self._total_pairs = 0
        self._total_bits = 0
        self._recent: deque[tuple[float, float]] = deque()  # (end, seconds) of the last steps
        self._p90_seconds: float | None = None
        self._last_step: float | None = None
        self._steps = 0
        self._steps_within_slo = 0
        self._unreachable_warned = False

    @property
    def shift(self) -> float:
        return self._shift

    def record_pairs(self, counts: Sequence[int]) -> None:
        """Add one layer call's pairs chosen under the policy (``counts``: pairs per bit value 0..8)."""
        with self._lock:
            for b, n in enumerate(counts):
                self._step_pairs[b] += n

    def step_finished(self, seconds: float, now: float) -> float:
        """One step took ``seconds`` (what its decoding requests waited for their token) and ended
        at ``now``; returns the shift for the next one."""
        with self._lock:
            pairs, self._step_pairs = self._step_pairs, [0] * 9
            count = sum(pairs)
            bits = sum(b * n for b, n in enumerate(pairs))
            self._total_pairs += count
            self._total_bits += bits
            dt = 0.0 if self._last_step is None else min(max(now - self._last_step, 0.0), MAX_STEP_GAP_S)
            self._last_step = now
            self._steps += 1
            if self.tpot_ms is not None:
                self._steps_within_slo += seconds * 1e3 <= self.tpot_ms
                self._steer_by_time(seconds, now, dt)
            else:
                self._steer_to_target(bits / count if count else None, count, dt)
            self._shift = shift_for_target(self.calibration, self._setpoint)
            return self._shift

    def _steer_to_target(self, step_bits: float | None, count: int, dt: float) -> None:
        if step_bits is not None:
            weight = count / (count + FULL_WEIGHT_PAIRS)
            self._correction += INTEGRAL_GAIN * weight * (self.target_bits - step_bits)
            # No wind-up beyond what the calibrated range can use.
            self._correction = min(max(self._correction, self.low - self.target_bits),
                                   self.high - self.target_bits)
        self._move_setpoint(self.target_bits + self._correction, dt, rate=TARGET_BITS_PER_S)

    def _steer_by_time(self, seconds: float, now: float, dt: float) -> None:
        self._recent.append((now, seconds))
        while len(self._recent) > MIN_WINDOW_STEPS and self._recent[0][0] < now - WINDOW_S:
            self._recent.popleft()
        ordered = sorted(s for _, s in self._recent)
        self._p90_seconds = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
        aim = HEADROOM * self.tpot_ms / 1e3
        ratio = self._p90_seconds / aim
        ceiling = self.high if self.target_bits is None else self.target_bits
        if ratio > 1.0:
            # Full speed once 20% over the aim; proportionally less nearer it.
            self._move_setpoint(self.low, dt, rate=MAX_FALL_BITS_PER_S * min(1.0, (ratio - 1.0) / 0.2))
        elif ratio < LOWER_BAND:
            self._move_setpoint(ceiling, dt, rate=MAX_RISE_BITS_PER_S * min(1.0, (LOWER_BAND - ratio) / 0.2))
        self._warn_if_unreachable()

    def _move_setpoint(self, goal: float, dt: float, rate: float | None = None) -> None:
        """Towards ``goal`` by at most ``rate`` (default: the direction's bound) bits per second."""
        if rate is None:
            rate = MAX_RISE_BITS_PER_S if goal > self._setpoint else MAX_FALL_BITS_PER_S
        step = min(abs(goal - self._setpoint), rate * dt)
        self._setpoint = min(max(self._setpoint + math.copysign(step, goal - self._setpoint), self.low), self.high)

    def _warn_if_unreachable(self) -> None:
        at_floor = self._setpoint <= self.low + 1e-9
        over = self._p90_seconds * 1e3 > self.tpot_ms
        if at_floor and over and not self._unreachable_warned:
            self._unreachable_warned = True
            logger.warning(
                "d2moe: slo tpot_ms=%g is not met even at the lowest reachable average width: p90 step "
                "%.1f ms at %.3f bits (the router reaches [%.3f, %.3f] bits); serving at the lowest",
                self.tpot_ms, self._p90_seconds * 1e3, self.low, self.low, self.high,
            )
        elif not (at_floor and over):
            self._unreachable_warned = False

    def snapshot(self) -> dict:
        """What the metrics show: the shift, the setpoint, the running average width of the policy's
        pairs, and (with an SLO) the recent p90 step time and the share of steps within it."""
        with self._lock:
            return {
                "shift": self._shift,
                "setpoint_bits": self._setpoint,
                "average_bits": self._total_bits / self._total_pairs if self._total_pairs else None,
                "pairs": self._total_pairs,
                "steps": self._steps,
                "target_bits": self.target_bits,
                "tpot_ms": self.tpot_ms,
                "p90_step_ms": None if self._p90_seconds is None else self._p90_seconds * 1e3,
                "slo_attainment": (self._steps_within_slo / self._steps
                                   if self.tpot_ms is not None and self._steps else None),
            }

    def reset_counts(self) -> None:
        """Restart the running average and the SLO attainment, and drop pairs not yet closed by a step
        (vLLM's profiling passes run layers outside steps); the steering state stays."""
        with self._lock:
            self._total_pairs = self._total_bits = self._steps = self._steps_within_slo = 0
            self._step_pairs = [0] * 9
