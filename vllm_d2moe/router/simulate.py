"""A transformers model whose experts run MWQ at per-pair widths: the router's
training model, and the cross-check of what vLLM serves.

:func:`load_simulated_model` loads a d2moe checkpoint's non-expert weights into
its transformers architecture and replaces every fused ``*Experts`` module
(transformers 5 gives Mixtral, Qwen2/3-MoE, OLMoE and DeepSeek-V2 one with
``forward(hidden, top_k_index, top_k_weights)``) by :class:`SimulatedExperts`,
which holds the layer's experts dequantized at each needed width and picks each
(token, expert) pair's width by the same rule serving uses
(:func:`vllm_d2moe.router.policy.choose_pair_widths`), or, while training, by
a straight-through Gumbel choice under the same capacities. Its experts multiply
in float32; :func:`vllm_d2moe.eval.simulated_kernels.compute_experts_with` has a
kernel backend compute them instead, rounding as served.
"""

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
from vllm_d2moe.mwq.quantize import dequantize
from vllm_d2moe.router.assign import choose_widths
from vllm_d2moe.router.model import WidthRouter
from vllm_d2moe.router.policy import ServingWidths, choose_pair_widths

_EXPERTS_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.*\.)?experts$")


class SimulatedExperts(torch.nn.Module):
    """One layer's MWQ experts, dequantized at ``widths``, with its width router.

    ``mode`` is set by the caller: ``"fixed:B"`` (every pair at width B, any
    loaded width), ``"serve"`` (``policy``, exactly as vLLM applies it) or
    ``"train"`` (straight-through Gumbel-softmax under ``policy.capacities``).
    After each forward, ``probs [pairs, K]`` (router probabilities, with
    gradient) and ``choice [pairs]`` (indices into ``policy.widths``) of that call are kept.
    """

    def __init__(self, checkpoint: MWQCheckpoint, layer: int, widths: list[int], policy: ServingWidths,
                 router: WidthRouter | None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.layer = layer
        entry = checkpoint.layer(layer)
        self.widths = sorted(set(widths) | set(policy.widths))
        gate_up, down = [], []
        for e in range(entry.num_experts):
            tensors = checkpoint.read_expert(layer, e, max(self.widths))
            gate_up.append(torch.stack([dequantize(tensors["gate_up"].truncate(b), dtype) for b in self.widths]))
            down.append(torch.stack([dequantize(tensors["down"].truncate(b), dtype) for b in self.widths]))
        # [widths, experts, rows, cols]
        self.register_buffer("gate_up", torch.stack(gate_up, 1), persistent=False)
        self.register_buffer("down", torch.stack(down, 1), persistent=False)
        self.policy = policy
        self.router = router
        self.mode = "serve"
        self.temperature = 1.0
        self.probs: torch.Tensor | None = None
        self.choice: torch.Tensor | None = None

    def expert_outputs(self, x: torch.Tensor, widths: tuple[int, ...], expert: int) -> torch.Tensor:
        """``[rows, len(widths), hidden]``: the expert's output at each of ``widths``."""
        index = [self.widths.index(b) for b in widths]
        gate_up = self.gate_up[index, expert]  # [K, 2I, H]
        hidden = (x @ gate_up.reshape(-1, gate_up.shape[-1]).t()).view(x.shape[0], len(widths), -1)
        gate, up = hidden.chunk(2, dim=-1)
        return torch.einsum("nki,khi->nkh", F.silu(gate) * up, self.down[index, expert])

    def _mixing(self, hidden, top_k_index, top_k_weights) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``[pairs, K]`` weight of each candidate width's output per pair, and the candidates."""
        if self.mode.startswith("fixed:"):
            width = int(self.mode.split(":")[1])
            return torch.ones(top_k_index.numel(), 1, device=hidden.device), (width,)
        widths = self.policy.widths
        logits = self.router(hidden, top_k_weights, top_k_index).reshape(-1, len(widths))
        self.probs = logits.softmax(-1)
        scores = logits.log_softmax(-1)
        if self.mode == "train":
            gumbel = -torch.log(-torch.log(torch.rand_like(scores).clamp_min(1e-20)))
            self.choice = choose_widths((scores + gumbel * self.temperature).detach(), self.policy.capacities)
            hard = F.one_hot(self.choice, len(widths)).to(scores.dtype)
            return hard + self.probs - self.probs.detach(), widths
        self.choice = choose_pair_widths(scores.detach(), self.policy)
        if self.policy.mode == "shuffled":
            self.choice = self.choice[torch.randperm(self.choice.numel(), device=self.choice.device)]
        return F.one_hot(self.choice, len(widths)).to(hidden.dtype), widths

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        mixing, widths = self._mixing(hidden, top_k_index, top_k_weights)
        top_k = top_k_index.shape[1]
        pair_expert = top_k_index.reshape(-1)
        pair_token = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(top_k)
        pair_weight = top_k_weights.reshape(-1, 1).to(hidden.dtype)
        out = torch.zeros_like(hidden)
        for expert in pair_expert.unique().tolist():
            pairs = (pair_expert == expert).nonzero().squeeze(1)
            x = hidden[pair_token[pairs]]
            if self.mode == "train":  # every width's output: the straight-through gradient needs them
                y = (mixing[pairs].unsqueeze(-1) * self.expert_outputs(x, widths, expert)).sum(1)
            else:  # serving computes only each pair's chosen width
                y = torch.zeros_like(x)
                for k in mixing[pairs].argmax(1).unique().tolist():
                    rows = (mixing[pairs, k] != 0).nonzero().squeeze(1)
                    y[rows] = self.expert_outputs(x[rows], (widths[k],), expert)[:, 0]
            out.index_add_(0, pair_token[pairs], y * pair_weight[pairs])
        return out


def simulated_experts(model: torch.nn.Module) -> dict[int, SimulatedExperts]:
    """The model's :class:`SimulatedExperts` by layer index."""
    return {m.layer: m for m in model.modules() if isinstance(m, SimulatedExperts)}


def set_mode(model: torch.nn.Module, mode: str) -> None:
    for module in simulated_experts(model).values():
        module.mode = mode


def load_simulated_model(
    model_dir: str | Path,
    policy: ServingWidths,
    routers: dict[int, WidthRouter] | None = None,
    extra_widths: list[int] = (),
    dtype: torch.dtype = torch.float32,
):
    """The checkpoint's transformers model with :class:`SimulatedExperts` in every MoE layer.

    Widths loaded: the policy's candidates plus ``extra_widths`` (e.g. a
    teacher's). ``routers`` (by layer) are used as given, so training updates them in place.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    checkpoint = MWQCheckpoint(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    # The d2moe quantization config is vLLM's; transformers would look for a quantizer.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the expert tensors are "missing" by design: replaced below
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype)
    finally:
        transformers_logging.set_verbosity(verbosity)
    replaced = 0
    for name, module in list(model.named_modules()):
        match = _EXPERTS_NAME.search(name)
        if match is None or not hasattr(module, "gate_up_proj"):
            continue
        layer = int(match.group(1))
        router = None if routers is None else routers.get(layer)
        simulated = SimulatedExperts(checkpoint, layer, list(extra_widths), policy, router, dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, simulated)
        replaced += 1
    if replaced != len(checkpoint.layers):
        raise ValueError(
            f"{model_dir}: found {replaced} fused expert modules in the transformers model, "
            f"the d2moe index has {len(checkpoint.layers)} MoE layers"
        )
    return model.eval()

