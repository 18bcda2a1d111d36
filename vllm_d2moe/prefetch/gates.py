"""The expert routers of a checkpoint, read for prediction: per MoE layer its
post-attention RMSNorm weight, its gate weight and (DeepSeek ``noaux_tc``) its
correction bias, with the model's :class:`~vllm_d2moe.prefetch.routing.RoutingRule`.

Works on a Hugging Face source checkpoint and on a d2moe conversion (which
keeps these dense tensors unchanged), single-file or sharded. Every decoder
layer of the supported architectures is ``h + attn(norm1(h))`` then
``+ experts(norm2(.))``; the router sees ``norm2`` of the post-attention
residual, so :meth:`CheckpointGates.moe_input` applies a later layer's
``norm2`` to any residual-stream state to get that layer's router input.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from vllm_d2moe.converters.architectures import architecture
from vllm_d2moe.prefetch.routing import RoutingRule

SHARD_INDEX = "model.safetensors.index.json"
# Mixtral's MoE block is ``block_sparse_moe`` in hub checkpoints, ``mlp`` when transformers 5
# writes its in-memory names; the other architectures always use ``mlp``.
_MOE_BLOCKS = ("block_sparse_moe", "mlp")


class GateError(ValueError):
    """A checkpoint's routers cannot be read for prediction; the message names file and tensor."""


@dataclass(frozen=True)
class LayerGate:
    """One MoE layer's router and the norm in front of it (float32)."""

    layer: int
    norm_weight: torch.Tensor  # [hidden]
    gate_weight: torch.Tensor  # [experts, hidden]
    correction_bias: torch.Tensor | None  # [experts], DeepSeek noaux_tc only


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it."""
    index = model_dir / SHARD_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise GateError(f"{index}: not a shard index ({e})") from e
        return {name: model_dir / file for name, file in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GateError(f"{model_dir} has no safetensors weights (no *.safetensors, no {SHARD_INDEX})")
    names = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                names.update(dict.fromkeys(f.keys(), file))
        except Exception as e:  # a truncated or foreign file
            raise GateError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    return names


class CheckpointGates:
    """Every MoE layer's :class:`LayerGate` of ``model_dir``, checked against its ``config.json``."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise GateError(f"{model_dir} has no config.json")
        config = json.loads(config_path.read_text())
        self.model_dir = model_dir
        self.rule = RoutingRule.from_config(config)
        self.hidden = config["hidden_size"]
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        self.moe_layers = architecture(config["model_type"]).moe_layers(config)
        files = _tensor_files(model_dir)
        self.gates = {layer: self._read_layer(files, layer) for layer in self.moe_layers}

    def _read(self, files: dict[str, Path], name: str, shape: tuple[int, ...], what: str) -> torch.Tensor:
        if name not in files:
            raise GateError(f"{self.model_dir}: tensor {name} ({what}) is missing from the checkpoint")
        try:
            with safe_open(files[name], framework="pt") as f:
                tensor = f.get_tensor(name)
        except Exception as e:  # a truncated or foreign file
            raise GateError(f"{files[name]}: cannot read tensor {name} ({type(e).__name__}: {e})") from e
        if tuple(tensor.shape) != shape:
            raise GateError(
                f"{files[name]}: tensor {name} ({what}) has shape {list(tensor.shape)}, "
                f"config.json implies {list(shape)}"
            )
        return tensor.float()

    def _read_layer(self, files: dict[str, Path], layer: int) -> LayerGate:
        prefix = f"model.layers.{layer}"
        block = next((b for b in _MOE_BLOCKS if f"{prefix}.{b}.gate.weight" in files), _MOE_BLOCKS[-1])
        experts = self.rule.num_experts
        bias = None
        if self.rule.corrected:
            bias = self._read(files, f"{prefix}.{block}.gate.e_score_correction_bias", (experts,),
                              f"layer {layer}'s router correction bias")
        return LayerGate(
            layer,
            self._read(files, f"{prefix}.post_attention_layernorm.weight", (self.hidden,),
                       f"layer {layer}'s norm before the router"),
            self._read(files, f"{prefix}.{block}.gate.weight", (experts, self.hidden), f"layer {layer}'s router"),
            bias,
        )

    def moe_input(self, layer: int, residual: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s RMSNorm applied to residual-stream states ``[tokens, hidden]`` (float32)."""
        # The order of transformers' RMSNorm, so that the true residual gives the router's input bit for bit.
        x = residual.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.gates[layer].norm_weight * x

    def residual_direction(self, layer: int, moe_input: torch.Tensor) -> torch.Tensor:
        """A residual-stream state (up to scale) from layer ``layer``'s normed MoE input: what the
        expert op sees. RMSNorm forgets only the scale, which no later norm reads back."""
        weight = self.gates[layer].norm_weight
        inverse = torch.where(weight != 0, 1.0 / weight, torch.zeros_like(weight))
        return moe_input.float() * inverse

    def logits(self, layer: int, moe_input: torch.Tensor) -> torch.Tensor:
        """Router logits ``[tokens, experts]`` (float32) of layer ``layer`` for its MoE input."""
        return torch.nn.functional.linear(moe_input.float(), self.gates[layer].gate_weight)

    def route(self, layer: int, moe_input: torch.Tensor, count: int | None = None):
        """Layer ``layer``'s routing of its MoE input: see :meth:`RoutingRule.rank`."""
        return self.rule.rank(self.logits(layer, moe_input), self.gates[layer].correction_bias, count)
