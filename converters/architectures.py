"""Where each supported MoE architecture keeps its routed experts.

A source checkpoint stores a MoE layer's routed experts in one of two layouts,
both in Hugging Face ``(out, in)`` orientation:

* per expert (hub checkpoints, and what transformers 5 ``save_pretrained``
  writes by default): three 2-D tensors per expert, gate ``[I, H]``, up
  ``[I, H]`` and down ``[H, I]``, e.g. Mixtral's
  ``model.layers.L.block_sparse_moe.experts.E.w1.weight`` (gate), ``w3`` (up),
  ``w2`` (down), or ``model.layers.L.mlp.experts.E.gate_proj.weight`` /
  ``up_proj`` / ``down_proj`` for the Qwen, OLMoE and DeepSeek families;
* fused (transformers 5's in-memory modules, written by
  ``save_pretrained(save_original_format=False)``): per layer
  ``model.layers.L.mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (each expert's
  gate rows, then its up rows) and ``model.layers.L.mlp.experts.down_proj``
  ``[E, H, I]``.

Every other tensor (attention, norms, embeddings, router, shared experts,
DeepSeek's dense first layers) is dense and copied unchanged.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property


class ConversionError(ValueError):
    """A source checkpoint cannot be converted; the message names the cause."""


PER_EXPERT_PROJECTIONS = ("gate", "up", "down")
FUSED_PROJECTIONS = ("gate_up", "down")
# transformers 5 names fused experts the same way for every architecture here
# (it renames Mixtral's ``block_sparse_moe`` to ``mlp``).
FUSED_TEMPLATE = "model.layers.{layer}.mlp.experts.{name}"
FUSED_NAMES = {"gate_up": "gate_up_proj", "down": "down_proj"}


@dataclass(frozen=True)
class ExpertTensor:
    """What an expert tensor holds: one projection of one expert, or (``expert``
    None) a fused projection of all experts of a layer."""

    layer: int
    expert: int | None
    projection: str


def _every_layer(config: dict, layer: int) -> bool:
    return True


def _qwen_moe_layer(config: dict, layer: int) -> bool:
    return (
        layer not in (config.get("mlp_only_layers") or [])
        and (layer + 1) % config.get("decoder_sparse_step", 1) == 0
    )


def _deepseek_moe_layer(config: dict, layer: int) -> bool:
    return (
        layer >= config.get("first_k_dense_replace", 0)
        and layer % config.get("moe_layer_freq", 1) == 0
    )


def _template_regex(template: str, names: dict[str, str]) -> re.Pattern:
    fields = {
        "layer": r"(?P<layer>\d+)",
        "expert": r"(?P<expert>\d+)",
        "name": "(?P<name>" + "|".join(map(re.escape, names.values())) + ")",
    }
    return re.compile(template.replace(".", r"\.").format(**fields) + "$")


@dataclass(frozen=True)
class Architecture:
    """Expert naming and sizing of one HF ``model_type`` (config.json keys are read as a dict)."""

    model_type: str
    per_expert_template: str  # fields {layer}, {expert}, {name}
    per_expert_names: dict[str, str]  # projection -> {name}
    # config.json key of the routed-expert count, then the alias transformers 5 may write instead
    num_experts_keys: tuple[str, ...]
    intermediate_key: str  # the routed experts' intermediate size
    is_moe_layer: Callable[[dict, int], bool]

    def per_expert_name(self, layer: int, expert: int, projection: str) -> str:
        return self.per_expert_template.format(
            layer=layer, expert=expert, name=self.per_expert_names[projection]
        )

    @staticmethod
    def fused_name(layer: int, projection: str) -> str:
        return FUSED_TEMPLATE.format(layer=layer, name=FUSED_NAMES[projection])

    @cached_property
    def _patterns(self) -> tuple[tuple[re.Pattern, dict[str, str]], ...]:
        return (
            (
                _template_regex(self.per_expert_template, self.per_expert_names),
                self.per_expert_names,
            ),
            (_template_regex(FUSED_TEMPLATE, FUSED_NAMES), FUSED_NAMES),
        )

    def classify(self, tensor_name: str) -> ExpertTensor | None:
        """The routed-expert tensor ``tensor_name`` is, or None for a dense tensor."""
        for pattern, names in self._patterns:
            match = pattern.match(tensor_name)
            if match:
                projection = next(p for p, n in names.items() if n == match["name"])
                expert = match.groupdict().get("expert")
                return ExpertTensor(
                    int(match["layer"]), None if expert is None else int(expert), projection
                )
        return None

    def moe_layers(self, config: dict) -> list[int]:
        if self.num_experts(config) == 0:
            return []
        return [i for i in range(config["num_hidden_layers"]) if self.is_moe_layer(config, i)]

    def num_experts(self, config: dict) -> int:
        for key in self.num_experts_keys:
            if key in config:
                return config[key]
        raise ConversionError(
            f"config.json of a {self.model_type} model has none of {self.num_experts_keys}"
        )

    def intermediate_size(self, config: dict) -> int:
        return config[self.intermediate_key]


def _qwen_style(
    model_type: str, num_experts_keys: tuple[str, ...], intermediate_key: str, is_moe_layer
) -> Architecture:
    return Architecture(
        model_type=model_type,
        per_expert_template="model.layers.{layer}.mlp.experts.{expert}.{name}.weight",
        per_expert_names={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
        num_experts_keys=num_experts_keys,
        intermediate_key=intermediate_key,
        is_moe_layer=is_moe_layer,
    )


ARCHITECTURES = {
    arch.model_type: arch
    for arch in (
        Architecture(
            model_type="mixtral",
            per_expert_template="model.layers.{layer}.block_sparse_moe.experts.{expert}.{name}.weight",
            per_expert_names={"gate": "w1", "up": "w3", "down": "w2"},
            num_experts_keys=("num_local_experts", "num_experts"),
            intermediate_key="intermediate_size",
            is_moe_layer=_every_layer,
        ),
        _qwen_style("qwen2_moe", ("num_experts",), "moe_intermediate_size", _qwen_moe_layer),
        _qwen_style(
            "qwen3_moe",
            ("num_experts", "num_local_experts"),
            "moe_intermediate_size",
            _qwen_moe_layer,
        ),
        _qwen_style(
            "olmoe", ("num_experts", "num_local_experts"), "intermediate_size", _every_layer
        ),
        _qwen_style(
            "deepseek_v2",
            ("n_routed_experts", "num_experts"),
            "moe_intermediate_size",
            _deepseek_moe_layer,
        ),
        _qwen_style(
            "deepseek_v3",
            ("n_routed_experts", "num_local_experts"),
            "moe_intermediate_size",
            _deepseek_moe_layer,
        ),
    )
}


def architecture(model_type: str | None) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ConversionError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
