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
    capacities: tuple[float, ...] | None = None
    shift: float = 0.0  # from ``target_bits``
    calibration: tuple[tuple[float, float], ...] = ()

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
) -> ServingWidths:
    """Check the width options against the checkpoint (``spec``: its MWQSpec) and resolve them.

    ``capacities`` is a list of fractions, ``"off"``, or None (the router's own).
    Every error names the option.
    """
    if bits is not None:
        if width_policy is not None and width_policy != f"fixed:{bits}":
            raise ValueError(f"d2moe options 'bits' ({bits}) and 'width_policy' ({width_policy!r}) disagree")
        width_policy = f"fixed:{bits}"
    has_router = RouterSet.exists(model_dir)
    if width_policy is None:
        width_policy = "router" if has_router else f"fixed:{spec.max_bits}"
    mode, _, argument = width_policy.partition(":")
    if mode not in MODES or (mode == "fixed") != bool(argument):
        raise ValueError(
            f"d2moe option 'width_policy' must be 'router', 'shuffled' or 'fixed:B', got {width_policy!r}"
        )
    if mode == "fixed":
        if target_bits is not None or capacities is not None:
            raise ValueError("d2moe options 'target_bits' and 'capacities' need width_policy 'router' or 'shuffled'")
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
    elif target_bits is None:
        capacities = routers.capacities
    shift = 0.0
    if target_bits is not None:
        shift = assign.shift_for_target(routers.calibration, float(target_bits))
    return ServingWidths(mode, tuple(routers.widths), capacities, shift, routers.calibration)


def choose_pair_widths(
    scores: torch.Tensor, policy: ServingWidths, pair_targets: torch.Tensor | None = None
) -> torch.Tensor:
    """Width index per pair from the router's ``scores [pairs, K]`` (log-probabilities).

    ``pair_targets [pairs]`` (NaN = none): pairs of requests with their own
    target use its shift and no capacities; the rest follow ``policy``.
    """
    default = assign.shift_scores(scores, policy.widths, policy.shift) if policy.shift else scores
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
