"""The online width controller (``vllm_d2moe.router.controller``) on a simulated plant.

The plant: a router whose served average width at a shift is the calibration
curve's minus a fixed mismatch (calibration tokens are not the served ones),
each pair drawn around that mean; a step's time grows with the concurrent
requests and the average width, with multiplicative noise. Simulated time runs
as fast as the loop (each step advances the clock by its own duration).
"""

import logging
import math
import random

import numpy as np
import pytest

from vllm_d2moe.router import controller as control
from vllm_d2moe.router.assign import shift_for_target
from vllm_d2moe.router.controller import WidthController

# (shift, average width), shift ascending: a nonlinear curve over widths 2..4.
CALIBRATION = ((-2.0, 4.0), (-1.0, 3.8), (-0.5, 3.4), (0.0, 3.0), (0.5, 2.6), (1.0, 2.2), (2.0, 2.0))
MISMATCH = 0.2  # the served tokens sit this much narrower than the calibration's at every shift


def _served_bits(shift: float) -> float:
    """The plant's mean width at ``shift``: the calibration curve (interpolated) minus the mismatch."""
    shifts, averages = zip(*CALIBRATION)
    return float(np.clip(np.interp(shift, shifts, averages) - MISMATCH, 2.0, 4.0))


def _pairs(mean: float, n: int, rng: np.random.Generator) -> list[int]:
    """``n`` pairs of widths 2..4 around ``mean``: each the floor or the ceiling of it."""
    low = min(math.floor(mean), 3)
    above = int(rng.binomial(n, mean - low))
    counts = [0] * 9
    counts[low], counts[low + 1] = n - above, above
    return counts


def _step_ms(load: int, bits: float, rng: random.Random) -> float:
    return (4.0 + load * (1.0 + 0.9 * bits)) * (1.0 + rng.gauss(0.0, 0.05))


def _simulate(controller: WidthController, loads: list[tuple[int, float]], seed: int = 0) -> list[dict]:
    """Run the plant under ``loads`` ([(concurrent requests, seconds)]); one record per step."""
    rng, pair_rng = random.Random(seed), np.random.default_rng(seed)
    now, trace = 0.0, []
    for phase, (load, seconds) in enumerate(loads):
        end = now + seconds
        while now < end:
            bits = _served_bits(controller.shift)
            controller.record_pairs(_pairs(bits, 8 * 2 * load, pair_rng))  # top-8, 2 layers
            ms = _step_ms(load, bits, rng)
            now += ms / 1e3
            controller.step_finished(ms / 1e3, now)
            trace.append({"t": now, "phase": phase, "load": load, "ms": ms, "bits": bits,
                          "setpoint": controller.snapshot()["setpoint_bits"]})
    return trace


def _slew(trace: list[dict]) -> float:
    """Largest setpoint change per second between consecutive steps."""
    return max(abs(b["setpoint"] - a["setpoint"]) / (b["t"] - a["t"]) for a, b in zip(trace, trace[1:]))


def _reversals(values: list[float]) -> int:
    """How often a sequence changes direction (flat stretches ignored)."""
    moves = [np.sign(b - a) for a, b in zip(values, values[1:]) if abs(b - a) > 1e-12]
    return sum(1 for a, b in zip(moves, moves[1:]) if a != b)


@pytest.mark.parametrize("target", [2.5, 3.0, 3.5])
def test_target_bits_holds_as_a_running_average(target):
    controller = WidthController(CALIBRATION, target_bits=target)
    trace = _simulate(controller, [(1, 20.0), (8, 20.0), (2, 20.0)])
    snapshot = controller.snapshot()
    # The calibrated shift alone would serve MISMATCH narrower; the controller makes it up.
    assert _served_bits(shift_for_target(CALIBRATION, target)) == pytest.approx(target - MISMATCH)
    assert snapshot["average_bits"] == pytest.approx(target, abs=0.05)
    late = [r["bits"] for r in trace if r["t"] > 10.0]
    assert np.mean(late) == pytest.approx(target, abs=0.05)
    assert _slew(trace) <= control.TARGET_BITS_PER_S + 1e-9
    assert snapshot["slo_attainment"] is None and snapshot["tpot_ms"] is None


@pytest.mark.parametrize("tpot_ms", [45.0, 60.0])
def test_slo_follows_the_load_within_the_goals(tpot_ms):
    ramp = [1, 2, 4, 8, 16, 8, 4, 2, 1]
    controller = WidthController(CALIBRATION, tpot_ms=tpot_ms)
    trace = _simulate(controller, [(load, 20.0) for load in ramp])
    low, high = _served_bits(CALIBRATION[-1][0]), _served_bits(CALIBRATION[0][0])
    for phase, load in enumerate(ramp):
        rows = [r for r in trace if r["phase"] == phase]
        settled = [r for r in rows if r["t"] > rows[0]["t"] + 10.0]
        p90 = np.percentile([r["ms"] for r in settled], 90)
        mean_bits = np.mean([r["bits"] for r in settled])
        # The widest fixed width (of 2, 3, 4) whose p90 meets the SLO at this load, if any.
        meeting = [b for b in (2, 3, 4) if (4.0 + load * (1.0 + 0.9 * b)) * (1 + 1.2816 * 0.05) <= tpot_ms]
        if _step_ms(load, low, random.Random(0)) * 1.07 <= tpot_ms:
            assert p90 <= tpot_ms, f"load {load}: p90 {p90:.1f} ms at {mean_bits:.2f} bits"
        if meeting:
            assert mean_bits >= min(max(meeting), high) - 0.25, f"load {load}: {mean_bits:.2f} bits"
        # Settled means settled: the setpoint neither swings nor hunts.
        setpoints = [r["setpoint"] for r in settled]
        assert max(setpoints) - min(setpoints) <= 0.3, f"load {load}: setpoint {min(setpoints)}..{max(setpoints)}"
        assert _reversals(setpoints) <= 2, f"load {load}"
    assert _slew(trace) <= control.MAX_FALL_BITS_PER_S + 1e-9
    # Back at one request the width is back at the top.
    assert trace[-1]["setpoint"] == pytest.approx(CALIBRATION[0][1])
    assert 0.9 <= controller.snapshot()["slo_attainment"] <= 1.0


def test_unreachable_slo_is_logged_with_the_reachable_range(caplog):
    controller = WidthController(CALIBRATION, tpot_ms=10.0)
    with caplog.at_level(logging.WARNING, logger=control.__name__):
        trace = _simulate(controller, [(8, 10.0)])
    assert trace[-1]["setpoint"] == pytest.approx(2.0)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "slo tpot_ms=10 is not met" in warnings[0] and "[2.000, 4.000]" in warnings[0]


def test_slo_with_target_bits_keeps_it_as_the_ceiling():
    controller = WidthController(CALIBRATION, target_bits=3.0, tpot_ms=1000.0)
    trace = _simulate(controller, [(1, 20.0)])
    assert max(r["setpoint"] for r in trace) == pytest.approx(3.0)


def test_idle_pause_gives_no_jump():
    controller = WidthController(CALIBRATION, tpot_ms=60.0)
    controller.step_finished(0.01, now=0.0)
    before = controller.snapshot()["setpoint_bits"]
    controller.step_finished(1.0, now=100.0)  # one slow step after 100 s of nothing
    moved = before - controller.snapshot()["setpoint_bits"]
    assert 0 < moved <= control.MAX_FALL_BITS_PER_S * control.MAX_STEP_GAP_S + 1e-9


def test_controller_options_are_checked():
    with pytest.raises(ValueError, match="target_bits 4.5 is outside the router's calibrated range"):
        WidthController(CALIBRATION, target_bits=4.5)
    with pytest.raises(ValueError, match="tpot_ms must be a positive number"):
        WidthController(CALIBRATION, tpot_ms=0)
    with pytest.raises(ValueError, match="retrain it with `d2moe train-router`"):
        WidthController((), tpot_ms=50.0)


@pytest.mark.parametrize("fused", [True, False], ids=["cpp", "torch"])
def test_selector_follows_the_controllers_shift(fused, monkeypatch):
    import torch

    from vllm_d2moe import width_selection
    from vllm_d2moe.router import assign
    from vllm_d2moe.router.model import WidthRouter
    from vllm_d2moe.router.policy import ServingWidths

    if not fused:
        monkeypatch.setattr(width_selection, "_fused_kernel", lambda: None)
    torch.manual_seed(3)
    router = WidthRouter(4, 16, 3)
    for p in router.parameters():
        torch.nn.init.normal_(p)
    policy = ServingWidths("router", (2, 3, 4), calibration=CALIBRATION, target_bits=3.0)
    controller = WidthController(CALIBRATION, target_bits=3.0)
    selector = width_selection.WidthSelector(0, policy, router, controller)
    x, ids, weights = torch.randn(64, 16), torch.randint(0, 4, (64, 2)), torch.rand(64, 2)
    scores = selector.scores(x, weights, ids)
    for shift in (controller.shift, -1.5, 1.5):
        controller._shift = shift  # as a step would leave it
        widths = selector(x, weights, ids)
        expected = assign.shift_scores(scores, policy.widths, shift).argmax(1)
        assert widths.reshape(-1).tolist() == [policy.widths[i] for i in expected.tolist()]
        # The controller counted exactly these pairs for its next step.
        assert controller._step_pairs == torch.bincount(widths.reshape(-1).long(), minlength=9).tolist()
        controller.step_finished(0.01, now=float(shift))
    # Requests with their own target are not the controller's: only the others are counted.
    targets = torch.full((64,), float("nan"))
    targets[:32] = 2.5
    widths = selector(x, weights, ids, targets)
    assert sum(controller._step_pairs) == 64


def test_controller_gauges_reach_prometheus():
    from prometheus_client import CollectorRegistry

    from vllm_d2moe.vllm_glue import metrics, width_control

    controller = WidthController(CALIBRATION, tpot_ms=50.0)
    controller.record_pairs([0, 0, 10, 0, 30, 0, 0, 0, 0])
    controller.step_finished(0.02, now=1.0)
    controller.step_finished(0.09, now=1.1)
    registry = CollectorRegistry()
    width_control.set_controller(controller)
    try:
        metrics.PrometheusPublisher(publish_widths=True, registry=registry).publish()
    finally:
        width_control.set_controller(None)
    value = registry.get_sample_value
    assert value("d2moe_width_shift") == pytest.approx(controller.shift)
    assert value("d2moe_controlled_average_bits") == pytest.approx(3.5)
    assert value("d2moe_slo_attainment") == pytest.approx(0.5)
    assert value("d2moe_width_setpoint_bits") == pytest.approx(controller.snapshot()["setpoint_bits"])
