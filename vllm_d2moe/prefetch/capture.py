"""What a transformers model's MoE layers see and route, captured with hooks: the data a
predictor is trained on (:mod:`vllm_d2moe.prefetch.train`) and scored against
(``benchmarks/prefetch_recall.py``). No engine: the model runs in torch.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_d2moe.mwq.checkpoint import EXPERTS_DIR, INDEX_NAME, MWQCheckpoint
from vllm_d2moe.prefetch.gates import CheckpointGates
from vllm_d2moe.router.policy import ServingWidths
from vllm_d2moe.router.simulate import load_simulated_model, set_mode


@dataclass
class Capture:
    """Per MoE layer, ``[windows, positions, ...]``: the residual entering the layer, its normed
    MoE input (what the router and the expert op get), and the experts and weights it routed."""

    layer_input: dict[int, torch.Tensor]
    moe_input: dict[int, torch.Tensor]
    routed_ids: dict[int, torch.Tensor]
    routed_weights: dict[int, torch.Tensor]


@torch.no_grad()
def capture(model, gates: CheckpointGates, windows: torch.Tensor, chunk: int = 8) -> Capture:
    """Run ``windows [n, T]`` token ids through ``model`` (a transformers ``*ForCausalLM``, its
    decoder only: no LM head) ``chunk`` windows at a time."""
    parts = {key: {m: [] for m in gates.moe_layers} for key in ("layer_input", "moe_input", "ids", "weights")}

    def keep_routing(m: int, x: torch.Tensor, out: tuple) -> None:  # returns None: the output stays
        parts["moe_input"][m].append(x.float().reshape(-1, x.shape[-1]))
        parts["ids"][m].append(out[2].long())
        parts["weights"][m].append(out[1].float())

    hooks = []
    for m in gates.moe_layers:
        block = model.model.layers[m]
        hooks.append(block.register_forward_pre_hook(
            lambda mod, args, m=m: parts["layer_input"][m].append(args[0].float())))
        hooks.append(block.mlp.gate.register_forward_hook(lambda mod, args, out, m=m: keep_routing(m, args[0], out)))
    try:
        for part in windows.split(chunk):
            model.model(input_ids=part)
    finally:
        for hook in hooks:
            hook.remove()
    n, t = windows.shape

    def stack(key):
        return {m: torch.cat(parts[key][m]).reshape(n, t, -1) for m in gates.moe_layers}

    return Capture(stack("layer_input"), stack("moe_input"), stack("ids"), stack("weights"))



def load_capture_model(model_dir: str | Path, bits: int | None = None):
    """The transformers model to capture from: a Hugging Face checkpoint in float32, or a d2moe
    checkpoint as served at the fixed width ``bits`` (default its widest; MWQ experts dequantized)."""
    if not (Path(model_dir) / EXPERTS_DIR / INDEX_NAME).is_file():
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bits = MWQCheckpoint(model_dir).spec.max_bits if bits is None else bits
    model = load_simulated_model(model_dir, ServingWidths("fixed", (bits,)))
    set_mode(model, f"fixed:{bits}")
    return model
