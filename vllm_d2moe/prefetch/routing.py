"""Each supported architecture's expert routing, computed as vLLM serves it.

A MoE layer's router turns its input ``x`` (the post-attention RMS-normed
hidden state) into logits ``x @ gate.T`` and picks ``top_k`` experts:

* Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: softmax over all experts, top-k;
  the top-k weights renormalised to sum to one for Mixtral always, for the
  Qwen families when ``norm_topk_prob``, for OLMoE never (vLLM's OLMoE ignores
  ``norm_topk_prob``).
* DeepSeek-V2/V3: vLLM's grouped top-k, always (``n_group`` 1 is plain top-k):
  ``scoring_func`` softmax (the default) or sigmoid; with ``topk_method``
  ``noaux_tc`` a per-expert correction bias is added to the scores for the
  choice only (not the weights) and a group scores the sum of its two best
  experts, otherwise its best one; only the ``topk_group`` best groups'
  experts compete; weights renormalised when ``norm_topk_prob``. The
  ``routed_scaling_factor`` is left out: on vLLM's CPU and CUDA paths it scales
  the layer's output, and the weights the expert method (and the bit-width
  router) sees are unscaled.

Where transformers routes differently (its DeepSeek-V2 ``greedy`` ignores
``n_group``, its DeepSeek-V3 always uses sigmoid and the bias), this follows
vLLM, which serves the checkpoint.
"""

from dataclasses import dataclass

import torch

from vllm_d2moe.converters.architectures import architecture

_DEEPSEEK = ("deepseek_v2", "deepseek_v3")


@dataclass(frozen=True)
class RoutingRule:
    """How one model picks each token's experts (the same rule in every MoE layer)."""

    num_experts: int
    top_k: int
    scoring: str  # "softmax" or "sigmoid"
    renormalize: bool
    grouped: bool  # DeepSeek's grouped top-k (vLLM uses it for every DeepSeek model)
    num_groups: int = 1
    top_groups: int = 1
    corrected: bool = False  # a per-expert e_score_correction_bias takes part in the choice

    @staticmethod
    def from_config(config: dict) -> "RoutingRule":
        """The rule of a ``config.json`` (as a dict); an unsupported model is an error naming it."""
        model_type = config.get("model_type")
        num_experts = architecture(model_type).num_experts(config)
        top_k = config["num_experts_per_tok"]
        if model_type in _DEEPSEEK:
            num_groups = config.get("n_group") or 1
            top_groups = config.get("topk_group") or 1
            if num_experts % num_groups or not 1 <= top_groups <= num_groups:
                raise ValueError(
                    f"config.json: n_group {num_groups} and topk_group {top_groups} do not split "
                    f"{num_experts} experts into groups"
                )
            scoring = config.get("scoring_func") or "softmax"
            if scoring not in ("softmax", "sigmoid"):
                raise ValueError(f"config.json: unsupported scoring_func {scoring!r}")
            return RoutingRule(
                num_experts, top_k, scoring, bool(config.get("norm_topk_prob")), True,
                num_groups, top_groups, config.get("topk_method") == "noaux_tc",
            )
        renormalize = {"mixtral": True, "olmoe": False}.get(model_type, bool(config.get("norm_topk_prob")))
        return RoutingRule(num_experts, top_k, "softmax", renormalize, False)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """``[tokens, experts]`` float32 scores of ``logits``."""
        logits = logits.float()
        return logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)

    def rank(
        self, logits: torch.Tensor, correction_bias: torch.Tensor | None = None, count: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights ``[tokens, count]`` (float32) and expert ids ``[tokens, count]`` (int64).

        The first ``top_k`` columns are the routed experts, best first, with the
        weights the expert method gets; ``count`` beyond ``top_k`` (default:
        ``top_k``) appends the next likeliest experts by choice score, groups
        ignored, with their scores renormalised by the routed experts' sum (what
        they would weigh had they been routed in place of the last).
        """
        count = self.top_k if count is None else count
        if not self.top_k <= count <= self.num_experts:
            raise ValueError(f"asked for {count} experts per token; the model routes {self.top_k} of "
                             f"{self.num_experts}")
        scores = self.scores(logits)
        choice = scores
        if self.corrected:
            if correction_bias is None:
                raise ValueError("this model's routing (topk_method noaux_tc) needs e_score_correction_bias")
            choice = scores + correction_bias.float()
        allowed = choice
        if self.grouped and self.num_groups > 1:
            grouped = choice.view(choice.shape[0], self.num_groups, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1) if self.corrected else grouped.amax(-1)
            best_groups = group_scores.topk(self.top_groups, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
            allowed = choice.masked_fill(~group_mask.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        routed = allowed.topk(self.top_k, dim=-1).indices
        if count > self.top_k:
            rest = choice.scatter(1, routed, float("-inf")).topk(count - self.top_k, dim=-1).indices
            ids = torch.cat([routed, rest], dim=1)
        else:
            ids = routed
        weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / weights[:, : self.top_k].sum(dim=-1, keepdim=True)
        return weights, ids
