"""Expert predictors: which experts (and widths) the next MoE layers will need.

Given a batch's hidden states at MoE layer ``l`` (a residual-stream state:
the input of layer ``l``, or its post-attention residual, which
:meth:`~vllm_d2moe.prefetch.gates.CheckpointGates.residual_direction`
recovers from the normed MoE input the expert op sees), a predictor returns
one :class:`LayerForecast` for each of the next ``depth`` MoE layers (a
DeepSeek dense layer is skipped, not counted).

``gate`` (chosen by name in :func:`build_predictor`, like ``learned``, its
trained refinement in :mod:`vllm_d2moe.prefetch.learned`):
each later layer's own router read from the checkpoint, applied to the current
state through that layer's own norm, top-k exactly as vLLM routes the model
(:mod:`vllm_d2moe.prefetch.routing`). With a width policy the checkpoint's
bit-width router applied to the same predicted input and weights gives each
routed pair's width by serving's rule (``router`` and ``shuffled`` alike:
the re-deal of ``shuffled`` is random, so the router's own choice is the best
guess); ``extra`` widens each token's set by the next likeliest experts, as
spare reads at the narrowest candidate width.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from vllm_d2moe.prefetch.gates import CheckpointGates
from vllm_d2moe.router.model import RouterSet
from vllm_d2moe.router.policy import ServingWidths, choose_pair_widths


@dataclass(frozen=True)
class LayerForecast:
    """What one later MoE layer is predicted to need for each token of the batch."""

    layer: int
    depth: int  # 1 = the next MoE layer
    expert_ids: torch.Tensor  # [tokens, top_k + extra] int64: the routed guess best first, then spares
    widths: torch.Tensor | None  # [tokens, top_k + extra] int8 bits; None without a width policy

    def per_expert(self) -> dict[int, tuple[int, int]]:
        """Each predicted expert's token count (its hotness) and widest predicted width: what a
        prefetch reads. Needs widths (a predictor built with a width policy)."""
        if self.widths is None:
            raise ValueError("a forecast without widths (predictor built without a width policy)")
        ids = self.expert_ids.reshape(-1)
        tokens = torch.bincount(ids)
        widest = torch.zeros_like(tokens).scatter_reduce(0, ids, self.widths.reshape(-1).long(), "amax")
        return {e: (tokens[e].item(), widest[e].item()) for e in ids.unique().tolist()}


class ExpertPredictor(Protocol):
    depth: int

    def predict(self, layer: int, hidden: torch.Tensor, token_targets: torch.Tensor | None = None
                ) -> list[LayerForecast]:
        """Forecasts for the ``depth`` MoE layers after ``layer`` from residual states ``[tokens, hidden]``;
        ``token_targets [tokens]``: per-request target widths (NaN = none), as the width selector gets them."""

    def predict_from_moe_input(self, layer: int, moe_input: torch.Tensor, token_targets: torch.Tensor | None = None
                               ) -> list[LayerForecast]:
        """:meth:`predict` from layer ``layer``'s normed MoE input (what the expert op sees)."""


class GatePredictor:
    """The ``gate`` predictor: later layers' routers applied to the current hidden state."""

    def __init__(
        self,
        gates: CheckpointGates,
        depth: int,
        extra: int = 0,
        policy: ServingWidths | None = None,
        routers: RouterSet | None = None,
    ):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        rule = gates.rule
        if not 0 <= extra <= rule.num_experts - rule.top_k:
            raise ValueError(f"prefetch extra experts must be in [0, {rule.num_experts - rule.top_k}] "
                             f"(the model routes {rule.top_k} of {rule.num_experts}), got {extra}")
        if policy is not None and policy.mode != "fixed" and routers is None:
            raise ValueError(f"width policy {policy.mode!r} needs the checkpoint's bit-width routers")
        self.gates = gates
        self.depth = depth
        self.extra = extra
        self.policy = policy
        self.routers = routers

    @staticmethod
    def from_checkpoint(
        model_dir: str | Path, depth: int, extra: int = 0, policy: ServingWidths | None = None
    ) -> "GatePredictor":
        gates = CheckpointGates(model_dir)
        routers = None
        if policy is not None and policy.mode != "fixed":
            routers = RouterSet.load(model_dir, layers=gates.moe_layers)
        return GatePredictor(gates, depth, extra, policy, routers)

    def later_layers(self, layer: int) -> list[int]:
        """The MoE layers ``depth`` ahead of ``layer``, nearest first."""
        return [m for m in self.gates.moe_layers if m > layer][: self.depth]

    def predict(self, layer: int, hidden: torch.Tensor, token_targets: torch.Tensor | None = None
                ) -> list[LayerForecast]:
        top_k = self.gates.rule.top_k
        forecasts = []
        for depth, later in enumerate(self.later_layers(layer), start=1):
            x = self.gates.moe_input(later, hidden)
            logits = self.logits(layer, later, x)
            weights, ids = self.gates.rule.rank(logits, self.gates.gates[later].correction_bias, top_k + self.extra)
            widths = None
            if self.policy is not None:
                widths = self._widths(later, x, weights[:, :top_k], ids, token_targets)
            forecasts.append(LayerForecast(later, depth, ids, widths))
        return forecasts

    def predict_from_moe_input(self, layer: int, moe_input: torch.Tensor, token_targets: torch.Tensor | None = None
                               ) -> list[LayerForecast]:
        """:meth:`predict` from layer ``layer``'s normed MoE input (what the expert op sees; the best
        tap in ``benchmarks/results/prefetch.md``)."""
        return self.predict(layer, self.gates.residual_direction(layer, moe_input), token_targets)

    def logits(self, layer: int, later: int, x: torch.Tensor) -> torch.Tensor:
        """Predicted router logits of MoE layer ``later`` from layer ``layer``'s state, normed as
        ``later``'s input: here that layer's own router."""
        return self.gates.logits(later, x)

    def _widths(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                token_targets: torch.Tensor | None) -> torch.Tensor:
        """Serving's width choice for the routed guess; the spares at the narrowest width."""
        policy = self.policy
        widths = torch.full(ids.shape, min(policy.widths), dtype=torch.int8)
        top_k = weights.shape[1]
        if policy.mode == "fixed":
            widths[:, :top_k] = policy.widths[0]
            return widths
        routed = ids[:, :top_k]
        scores = torch.log_softmax(self.routers.routers[layer](x, weights, routed), dim=-1)
        pair_targets = None if token_targets is None else token_targets.repeat_interleave(top_k)
        choice = choose_pair_widths(scores.reshape(-1, len(policy.widths)), policy, pair_targets)
        table = torch.tensor(policy.widths, dtype=torch.int8)
        widths[:, :top_k] = table[choice].view_as(routed)
        return widths


PREDICTORS = ("gate", "learned")


def build_predictor(
    model_dir: str | Path,
    predictor: str,
    depth: int,
    extra: int = 0,
    policy: ServingWidths | None = None,
) -> ExpertPredictor:
    """The predictor named by the ``prefetch`` option's ``predictor``; errors name the option or file."""
    if predictor == "gate":
        return GatePredictor.from_checkpoint(model_dir, depth, extra, policy)
    if predictor == "learned":
        from vllm_d2moe.prefetch.learned import LearnedPredictor  # it builds on this module

        return LearnedPredictor.load(model_dir, depth, extra, policy)
    raise ValueError(f"prefetch option 'predictor' must be one of {list(PREDICTORS)}, got {predictor!r}")
