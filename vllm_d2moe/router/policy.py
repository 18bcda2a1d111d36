"""Width policies: the ``width_policy`` options resolved against a checkpoint, and the
per-pair width choice from router scores under one (serving and the simulated model share it).

:mod:`vllm_d2moe.width_selection` applies a policy in every MoE layer.
"""

from dataclasses import dataclass

import torch

from vllm_d2moe.router import assign
from vllm_d2moe.router.model import RouterSet

MODES = ("router", "fixed", "shuffled")


@dataclass(frozen=True)
class ServingWidths:
    """A resolved width policy: what every layer's :class:`WidthSelector` applies."""

    mode: str
    widths: tuple[int, ...]  # candidate widths, ascending (one for ``fixed``)
    capacities: tuple[float, ...] | None = None  # per-call caps: only when asked for (option ``capacities``)
    shift: float = 0.0  # the calibrated shift of ``target_bits`` (or of the trained capacities' average)
    calibration: tuple[tuple[float, float], ...] = ()
    target_bits: float | None = None  # held online as a running average (router/controller.py)
    tpot_ms: float | None = None  # option ``slo``: the time per output token the controller keeps

    @property
    def adaptive(self) -> bool:
        """Whether a :class:`~vllm_d2moe.router.controller.WidthController` steers the shift."""
        return self.mode != "fixed" and (self.target_bits is not None or self.tpot_ms is not None)

    @property
    def resident_bits(self) -> int:
        """The widest width any pair may get: what the experts must hold."""
        return max(self.widths)


def resolve_policy(
    model_dir: str,
    spec,
    width_policy: str | None,
    bits: int | None,
    target_bits: float | None,
    capacities,
    slo: dict | None = None,
) -> ServingWidths:
    """Check the width options against the checkpoint (``spec``: its MWQSpec) and resolve them.

    ``capacities`` is a list of fractions enforced per layer call (opt-in: by default a
    pair's width depends on no other pair), or ``"off"``/None (none). Without ``target_bits``
    the shift is the calibrated one for the trained capacities' average width, fixed;
    ``target_bits`` and ``slo`` (``{"tpot_ms": T}``) make it adaptive. Every error names the option.
    """
    if bits is not None:
        if width_policy is not None and width_policy != f"fixed:{bits}":
            raise ValueError(f"d2moe options 'bits' ({bits}) and 'width_policy' ({width_policy!r}) disagree")
        width_policy = f"fixed:{bits}"
    tpot_ms = _check_slo(slo)
    has_router = RouterSet.exists(model_dir)
    if tpot_ms is not None and not has_router:
        raise ValueError(f"d2moe option 'slo' steers the learned bit-width router, and {model_dir} has none: "
                         f"train one with `d2moe train-router {model_dir}`")
    if width_policy is None:
        width_policy = "router" if has_router else f"fixed:{spec.max_bits}"
    mode, _, argument = width_policy.partition(":")
    if mode not in MODES or (mode == "fixed") != bool(argument):
        raise ValueError(
            f"d2moe option 'width_policy' must be 'router', 'shuffled' or 'fixed:B', got {width_policy!r}"
        )
    if mode == "fixed":
        if target_bits is not None or capacities is not None or tpot_ms is not None:
            raise ValueError("d2moe options 'target_bits', 'capacities' and 'slo' need width_policy 'router' "
                             "or 'shuffled'")
        try:
            fixed = int(argument)
        except ValueError:
            raise ValueError(f"d2moe option 'width_policy': {argument!r} is not a bit-width") from None
        return ServingWidths("fixed", (spec.check_width(fixed, "d2moe width"),))
    routers = RouterSet.load(model_dir, layers=[])  # metadata only; also the "no router" error
    for b in routers.widths:
        spec.check_width(b, "router width")
    if capacities == "off":
        capacities = None
    elif capacities is not None:
        capacities = assign.check_capacities(capacities, len(routers.widths), "d2moe option 'capacities'")
    if target_bits is not None:
        target_bits = float(target_bits)
        shift = assign.shift_for_target(routers.calibration, target_bits)  # outside the range: the error
    else:
        shift = _trained_mix_shift(routers)
    if tpot_ms is not None and not routers.calibration:
        assign.shift_for_target(routers.calibration, 0.0)  # the "retrain it" error
    return ServingWidths(mode, tuple(routers.widths), capacities, shift, routers.calibration, target_bits, tpot_ms)


def _check_slo(slo) -> float | None:
    """The ``slo`` option's time per output token in ms (None without one)."""
    if slo is None:
        return None
    if not isinstance(slo, dict) or set(slo) != {"tpot_ms"}:
        raise ValueError(f"d2moe option 'slo' must be {{\"tpot_ms\": T}}, got {slo!r}")
    tpot_ms = slo["tpot_ms"]
    if isinstance(tpot_ms, bool) or not isinstance(tpot_ms, (int, float)) or not tpot_ms > 0:
        raise ValueError(f"d2moe option 'slo': tpot_ms must be a positive number of milliseconds, got {tpot_ms!r}")
    return float(tpot_ms)


def _trained_mix_shift(routers: RouterSet) -> float:
    """The calibrated shift for the average width of the trained capacities (0 without capacities or
    calibration): the mix training aimed at, reached per pair instead of per call."""
    if not routers.capacities or not routers.calibration:
        return 0.0
    averages = [a for _, a in routers.calibration]
    trained = sum(c * b for c, b in zip(routers.capacities, routers.widths))
    return assign.shift_for_target(routers.calibration, min(max(trained, min(averages)), max(averages)))


def choose_pair_widths(
    scores: torch.Tensor, policy: ServingWidths, pair_targets: torch.Tensor | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """Width index per pair from the router's ``scores [pairs, K]`` (log-probabilities).

    ``pair_targets [pairs]`` (NaN = none): pairs of requests with their own
    target use its shift and no capacities; the rest follow ``policy``, at
    ``shift`` (the online controller's) or else the policy's own.
    """
    shift = policy.shift if shift is None else shift
    default = assign.shift_scores(scores, policy.widths, shift) if shift else scores
    if pair_targets is None or bool(torch.isnan(pair_targets).all()):
        return assign.choose_widths(default, policy.capacities)
    own = ~torch.isnan(pair_targets)
    choice = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    rest = (~own).nonzero().squeeze(1)
    if rest.numel():
        choice[rest] = assign.choose_widths(default[rest], policy.capacities)
    for target in pair_targets[own].unique().tolist():
        pairs = (pair_targets == target).nonzero().squeeze(1)
        shift = assign.shift_for_target(policy.calibration, target)
        choice[pairs] = assign.shift_scores(scores[pairs], policy.widths, shift).argmax(dim=1)
    return choice
