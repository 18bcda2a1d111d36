"""The transformers simulation of a d2moe checkpoint (:mod:`vllm_d2moe.router.simulate`) with its experts computed
by a kernel backend, as vLLM serves them, rather than in float32: for cross-checks of served tokens and for the
accuracy cost of a kernel's own rounding (the CPU kernel's bfloat16 lookup tables, int8 activations)."""

from pathlib import Path

import torch

from vllm_d2moe.experts import ExpertSegments, load_layer_experts
from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
from vllm_d2moe.router.simulate import simulated_experts


def compute_experts_with(model: torch.nn.Module, model_dir: str | Path, backend, token_segments: bool = False) -> None:
    """Have every :class:`SimulatedExperts` of ``model`` (loaded from ``model_dir``) compute its experts with kernel
    ``backend`` (a ``vllm_d2moe.kernels`` module, on the CPU), as vLLM serves them, instead of float32 products of
    dequantized weights: the experts resident at the widest width, each call's tokens of an (expert, width) one
    segment, or with ``token_segments`` each token its own (decode's segments)."""
    checkpoint = MWQCheckpoint(model_dir)
    for layer, module in simulated_experts(model).items():
        experts = load_layer_experts(
            checkpoint, layer, list(range(checkpoint.layer(layer).num_experts)), max(module.widths), 0, 1, backend
        )

        def expert_outputs(x, widths, expert, experts=experts):
            n = len(x)
            starts = tuple(range(n + 1)) if token_segments else (0, n)
            outputs = []
            for bits in widths:
                segments = ExpertSegments((expert,) * (len(starts) - 1), (bits,) * (len(starts) - 1), starts)
                out = torch.empty(n, x.shape[1])
                backend.grouped_mlp(x, experts.gate_up, experts.down, segments, out)
                outputs.append(out.to(x.dtype))
            return torch.stack(outputs, 1)

        module.expert_outputs = expert_outputs
