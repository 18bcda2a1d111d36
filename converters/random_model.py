"""``d2moe random-model PRESET OUT``: a random-weight Hugging Face checkpoint with a real model's shape.

Each preset is the ``config.json`` of a published MoE model (as on its hub page).
The checkpoint has that config and tensor layout (per-expert tensors under the
hub names, bf16), random weights drawn from ``normal(0, initializer_range)``
(RMSNorm weights 1, as the models initialise them), and the embedded reference
model's tokenizer: the vocabulary shrinks to that tokenizer's 8192 tokens, and
``config.json``'s ``d2moe_random_model`` field says so, with the preset's
original values. ``--layers N`` keeps the first N decoder layers.

Weights are written one decoder layer per safetensors shard, one tensor at a
time, so memory stays at about one tensor whatever the depth; the checkpoint is
built in a hidden folder next to OUT and renamed into place when complete.
"""

import importlib.resources
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from vllm_d2moe.converters.architectures import architecture
from vllm_d2moe.converters.output_dir import OutputDirectory
from vllm_d2moe.mwq.checkpoint import safetensors_header

TOKENIZER_DIR = Path(str(importlib.resources.files("vllm_d2moe") / "assets" / "reference-small"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TOKENIZER_VOCAB = 8192
BOS_ID, EOS_ID = 0, 1
SHARD_INDEX = "model.safetensors.index.json"
DTYPE = torch.bfloat16
SAFETENSORS_DTYPE = "BF16"


@dataclass(frozen=True)
class Preset:
    """A published model's config.json (hub field names and values)."""

    name: str
    hub_id: str
    config: dict

    @property
    def model_type(self) -> str:
        return self.config["model_type"]


PRESETS = {
    p.name: p
    for p in (
        Preset(
            "olmoe-1b-7b",
            "allenai/OLMoE-1B-7B-0924",
            {
                "architectures": ["OlmoeForCausalLM"],
                "model_type": "olmoe",
                "attention_bias": False,
                "attention_dropout": 0.0,
                "clip_qkv": None,
                "hidden_act": "silu",
                "hidden_size": 2048,
                "initializer_range": 0.02,
                "intermediate_size": 1024,
                "max_position_embeddings": 4096,
                "norm_topk_prob": False,
                "num_attention_heads": 16,
                "num_experts": 64,
                "num_experts_per_tok": 8,
                "num_hidden_layers": 16,
                "num_key_value_heads": 16,
                "output_router_logits": False,
                "rms_norm_eps": 1e-05,
                "rope_scaling": None,
                "rope_theta": 10000.0,
                "router_aux_loss_coef": 0.01,
                "tie_word_embeddings": False,
                "use_cache": True,
                "vocab_size": 50304,
                "bos_token_id": None,
                "eos_token_id": 50279,
                "pad_token_id": 1,
            },
        ),
        Preset(
            "qwen3-30b-a3b",
            "Qwen/Qwen3-30B-A3B",
            {
                "architectures": ["Qwen3MoeForCausalLM"],
                "model_type": "qwen3_moe",
                "attention_bias": False,
                "attention_dropout": 0.0,
                "decoder_sparse_step": 1,
                "head_dim": 128,
                "hidden_act": "silu",
                "hidden_size": 2048,
                "initializer_range": 0.02,
                "intermediate_size": 6144,
                "max_position_embeddings": 40960,
                "max_window_layers": 48,
                "mlp_only_layers": [],
                "moe_intermediate_size": 768,
                "norm_topk_prob": True,
                "num_attention_heads": 32,
                "num_experts": 128,
                "num_experts_per_tok": 8,
                "num_hidden_layers": 48,
                "num_key_value_heads": 4,
                "output_router_logits": False,
                "rms_norm_eps": 1e-06,
                "rope_scaling": None,
                "rope_theta": 1000000.0,
                "router_aux_loss_coef": 0.001,
                "sliding_window": None,
                "tie_word_embeddings": False,
                "use_cache": True,
                "use_sliding_window": False,
                "vocab_size": 151936,
                "bos_token_id": 151643,
                "eos_token_id": 151645,
            },
        ),
        Preset(
            "mixtral-8x7b",
            "mistralai/Mixtral-8x7B-v0.1",
            {
                "architectures": ["MixtralForCausalLM"],
                "model_type": "mixtral",
                "attention_dropout": 0.0,
                "hidden_act": "silu",
                "hidden_size": 4096,
                "initializer_range": 0.02,
                "intermediate_size": 14336,
                "max_position_embeddings": 32768,
                "num_attention_heads": 32,
                "num_experts_per_tok": 2,
                "num_hidden_layers": 32,
                "num_key_value_heads": 8,
                "num_local_experts": 8,
                "output_router_logits": False,
                "rms_norm_eps": 1e-05,
                "rope_theta": 1000000.0,
                "router_aux_loss_coef": 0.02,
                "sliding_window": None,
                "tie_word_embeddings": False,
                "use_cache": True,
                "vocab_size": 32000,
                "bos_token_id": 1,
                "eos_token_id": 2,
            },
        ),
        Preset(
            "deepseek-v2-lite",
            "deepseek-ai/DeepSeek-V2-Lite",
            {
                "architectures": ["DeepseekV2ForCausalLM"],
                "model_type": "deepseek_v2",
                "attention_bias": False,
                "attention_dropout": 0.0,
                "first_k_dense_replace": 1,
                "hidden_act": "silu",
                "hidden_size": 2048,
                "initializer_range": 0.02,
                "intermediate_size": 10944,
                "kv_lora_rank": 512,
                "max_position_embeddings": 163840,
                "moe_intermediate_size": 1408,
                "moe_layer_freq": 1,
                "n_group": 1,
                "n_routed_experts": 64,
                "n_shared_experts": 2,
                "norm_topk_prob": False,
                "num_attention_heads": 16,
                "num_experts_per_tok": 6,
                "num_hidden_layers": 27,
                "num_key_value_heads": 16,
                "q_lora_rank": None,
                "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64,
                "rms_norm_eps": 1e-06,
                "rope_scaling": {
                    "beta_fast": 32,
                    "beta_slow": 1,
                    "factor": 40,
                    "mscale": 0.707,
                    "mscale_all_dim": 0.707,
                    "original_max_position_embeddings": 4096,
                    "type": "yarn",
                },
                "rope_theta": 10000,
                "routed_scaling_factor": 1.0,
                "scoring_func": "softmax",
                "tie_word_embeddings": False,
                "topk_group": 1,
                "topk_method": "greedy",
                "use_cache": True,
                "v_head_dim": 128,
                "vocab_size": 102400,
                "bos_token_id": 100000,
                "eos_token_id": 100001,
            },
        ),
    )
}

# Config fields replaced because the embedded tokenizer replaces the model's own.
TOKENIZER_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


class RandomModelError(ValueError):
    """A preset or option cannot be written; the message names which."""


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    is_norm: bool = False  # RMSNorm weight: written as ones

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _norm(name: str, size: int) -> TensorPlan:
    return TensorPlan(name, (size,), is_norm=True)


def _mlp(prefix: str, names: tuple[str, str, str], hidden: int, inter: int) -> list[TensorPlan]:
    gate, up, down = names
    return [
        TensorPlan(f"{prefix}.{gate}.weight", (inter, hidden)),
        TensorPlan(f"{prefix}.{up}.weight", (inter, hidden)),
        TensorPlan(f"{prefix}.{down}.weight", (hidden, inter)),
    ]


def _gqa_attention(prefix: str, c: dict, qk_norm: str | None) -> list[TensorPlan]:
    """q/k/v/o projections; ``qk_norm``: None, "head" (Qwen3, per head) or "full" (OLMoE)."""
    hidden, heads, kv_heads = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    tensors = [
        TensorPlan(f"{prefix}.q_proj.weight", (heads * head_dim, hidden)),
        TensorPlan(f"{prefix}.k_proj.weight", (kv_heads * head_dim, hidden)),
        TensorPlan(f"{prefix}.v_proj.weight", (kv_heads * head_dim, hidden)),
        TensorPlan(f"{prefix}.o_proj.weight", (hidden, heads * head_dim)),
    ]
    if qk_norm == "head":
        tensors += [
            _norm(f"{prefix}.q_norm.weight", head_dim),
            _norm(f"{prefix}.k_norm.weight", head_dim),
        ]
    elif qk_norm == "full":
        tensors += [
            _norm(f"{prefix}.q_norm.weight", heads * head_dim),
            _norm(f"{prefix}.k_norm.weight", kv_heads * head_dim),
        ]
    return tensors


def _mla_attention(prefix: str, c: dict) -> list[TensorPlan]:
    """DeepSeek-V2's multi-head latent attention (``q_lora_rank`` None or a rank)."""
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    nope, rope, v_dim, kv_rank = (
        c["qk_nope_head_dim"],
        c["qk_rope_head_dim"],
        c["v_head_dim"],
        c["kv_lora_rank"],
    )
    if c.get("q_lora_rank") is None:
        tensors = [TensorPlan(f"{prefix}.q_proj.weight", (heads * (nope + rope), hidden))]
    else:
        q_rank = c["q_lora_rank"]
        tensors = [
            TensorPlan(f"{prefix}.q_a_proj.weight", (q_rank, hidden)),
            _norm(f"{prefix}.q_a_layernorm.weight", q_rank),
            TensorPlan(f"{prefix}.q_b_proj.weight", (heads * (nope + rope), q_rank)),
        ]
    return tensors + [
        TensorPlan(f"{prefix}.kv_a_proj_with_mqa.weight", (kv_rank + rope, hidden)),
        _norm(f"{prefix}.kv_a_layernorm.weight", kv_rank),
        TensorPlan(f"{prefix}.kv_b_proj.weight", (heads * (nope + v_dim), kv_rank)),
        TensorPlan(f"{prefix}.o_proj.weight", (hidden, heads * v_dim)),
    ]


def _routed_experts(c: dict, layer: int, prefix: str) -> list[TensorPlan]:
    """The router and every routed expert, named as the converter reads them."""
    arch = architecture(c["model_type"])
    hidden, inter, n = c["hidden_size"], arch.intermediate_size(c), arch.num_experts(c)
    tensors = [TensorPlan(f"{prefix}.gate.weight", (n, hidden))]
    for e in range(n):
        for projection, shape in (
            ("gate", (inter, hidden)),
            ("up", (inter, hidden)),
            ("down", (hidden, inter)),
        ):
            tensors.append(TensorPlan(arch.per_expert_name(layer, e, projection), shape))
    return tensors


def _layer_olmoe(c: dict, layer: int) -> list[TensorPlan]:
    p = f"model.layers.{layer}"
    return _gqa_attention(f"{p}.self_attn", c, "full") + _routed_experts(c, layer, f"{p}.mlp")


def _layer_qwen3_moe(c: dict, layer: int) -> list[TensorPlan]:
    p = f"model.layers.{layer}"
    if architecture("qwen3_moe").is_moe_layer(c, layer):
        mlp = _routed_experts(c, layer, f"{p}.mlp")
    else:
        mlp = _mlp(
            f"{p}.mlp",
            ("gate_proj", "up_proj", "down_proj"),
            c["hidden_size"],
            c["intermediate_size"],
        )
    return _gqa_attention(f"{p}.self_attn", c, "head") + mlp


def _layer_mixtral(c: dict, layer: int) -> list[TensorPlan]:
    p = f"model.layers.{layer}"
    return _gqa_attention(f"{p}.self_attn", c, None) + _routed_experts(
        c, layer, f"{p}.block_sparse_moe"
    )


def _layer_deepseek_v2(c: dict, layer: int) -> list[TensorPlan]:
    p = f"model.layers.{layer}"
    hidden = c["hidden_size"]
    names = ("gate_proj", "up_proj", "down_proj")
    if architecture("deepseek_v2").is_moe_layer(c, layer):
        mlp = _routed_experts(c, layer, f"{p}.mlp")
        if c.get("n_shared_experts"):
            shared = c["n_shared_experts"] * c["moe_intermediate_size"]
            mlp += _mlp(f"{p}.mlp.shared_experts", names, hidden, shared)
    else:
        mlp = _mlp(f"{p}.mlp", names, hidden, c["intermediate_size"])
    return _mla_attention(f"{p}.self_attn", c) + mlp


LAYER_PLANS: dict[str, Callable[[dict, int], list[TensorPlan]]] = {
    "olmoe": _layer_olmoe,
    "qwen3_moe": _layer_qwen3_moe,
    "mixtral": _layer_mixtral,
    "deepseek_v2": _layer_deepseek_v2,
}


def layer_plan(config: dict, layer: int) -> list[TensorPlan]:
    """Every tensor of decoder layer ``layer`` (hub names and shapes), norms included."""
    p = f"model.layers.{layer}"
    hidden = config["hidden_size"]
    norms = [
        _norm(f"{p}.input_layernorm.weight", hidden),
        _norm(f"{p}.post_attention_layernorm.weight", hidden),
    ]
    return LAYER_PLANS[config["model_type"]](config, layer) + norms


def shard_plans(config: dict) -> list[list[TensorPlan]]:
    """The tensors of each shard: one shard per decoder layer; embeddings go in the first,
    the final norm and LM head in the last."""
    vocab, hidden, layers = config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]
    shards = [layer_plan(config, i) for i in range(layers)]
    shards[0].insert(0, TensorPlan("model.embed_tokens.weight", (vocab, hidden)))
    shards[-1].append(_norm("model.norm.weight", hidden))
    if not config.get("tie_word_embeddings", False):
        shards[-1].append(TensorPlan("lm_head.weight", (vocab, hidden)))
    return shards


def model_config(preset: str, layers: int | None = None, seed: int = 0, **overrides) -> dict:
    """The hub config.json of ``preset`` as written: depth truncated to ``layers``, the
    tokenizer fields replaced, and a ``d2moe_random_model`` note. ``overrides`` replace
    further fields (tests use them to shrink widths; the note lists them)."""
    if preset not in PRESETS:
        raise RandomModelError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    config = dict(p.config)
    full_layers = config["num_hidden_layers"]
    if layers is not None:
        if not 1 <= layers <= full_layers:
            raise RandomModelError(
                f"--layers must be in [1, {full_layers}] for {preset}, got {layers}"
            )
        config["num_hidden_layers"] = layers
    unknown = set(overrides) - set(config)
    if unknown:
        raise RandomModelError(f"{preset} has no config field(s) {sorted(unknown)} to override")
    config.update(overrides)
    moe_layers = architecture(p.model_type).moe_layers(config)
    if not moe_layers:
        raise RandomModelError(
            f"{preset} truncated to {config['num_hidden_layers']} layer(s) has no MoE layer "
            f"(its first MoE layer is {architecture(p.model_type).moe_layers(p.config)[0]}); "
            f"use more --layers"
        )
    replaced = {k: p.config.get(k) for k in TOKENIZER_FIELDS}
    config.update(
        vocab_size=TOKENIZER_VOCAB, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None
    )
    config["dtype"] = "bfloat16"
    config["d2moe_random_model"] = {
        "preset": preset,
        "shape_of": p.hub_id,
        "seed": seed,
        "note": (
            "random weights (normal, std initializer_range; norms 1) with this model's config; "
            "the vocabulary shrank to the embedded reference tokenizer's "
            f"{TOKENIZER_VOCAB} tokens"
            + (
                f", the depth to {config['num_hidden_layers']} of {full_layers} layers"
                if layers
                else ""
            )
        ),
        "original": {
            **replaced,
            "num_hidden_layers": full_layers,
            **{k: p.config[k] for k in overrides},
        },
    }
    return config


def _hf_config_json(config: dict) -> dict:
    """``config`` through its transformers config class, so the file reads as transformers
    5 writes it (e.g. ``rope_parameters``), with ``architectures`` kept."""
    fields = {k: v for k, v in config.items() if k != "model_type"}
    hf = transformers.AutoConfig.for_model(config["model_type"], **fields)
    out = hf.to_dict()
    out["architectures"] = config["architectures"]
    for key in ("id2label", "label2id", "_name_or_path"):  # defaults meaningless here
        out.pop(key, None)
    return out


def _random_tensor(t: TensorPlan, std: float, generator: torch.Generator) -> torch.Tensor:
    if t.is_norm:
        return torch.ones(t.shape, dtype=DTYPE)
    return (
        torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=generator).to(DTYPE)
    )


def _write_shard(path: Path, tensors: list[TensorPlan], std: float, seed: int, bar) -> None:
    """Write one shard tensor by tensor (the header is known from the shapes)."""
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        entries = [(t.name, SAFETENSORS_DTYPE, list(t.shape), t.numel * DTYPE.itemsize) for t in tensors]
        f.write(safetensors_header(entries, {"format": "pt"}))
        for t in tensors:
            value = _random_tensor(t, std, generator)
            f.write(value.view(torch.int16).numpy().data)
            bar.update(value.numel() * DTYPE.itemsize)


def write_random_model(
    preset: str,
    out,
    layers: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    **overrides,
) -> Path:
    """Write the random ``preset`` checkpoint to ``out``; return its path."""
    config = model_config(preset, layers, seed, **overrides)
    shards = shard_plans(config)
    total = sum(t.numel for shard in shards for t in shard) * DTYPE.itemsize
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with OutputDirectory(Path(out), overwrite=overwrite, resumable=False) as work:
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"d2moe random-model {preset}",
            disable=not progress,
        ) as bar:
            for i, (name, tensors) in enumerate(zip(names, shards)):
                # One generator per shard, seeded from (seed, shard): a shard's weights do not
                # depend on the others, so --layers N is a prefix of the full model.
                _write_shard(
                    work.path / name,
                    tensors,
                    config["initializer_range"],
                    seed * 1_000_003 + i,
                    bar,
                )
        index = {
            "metadata": {"total_size": total},
            "weight_map": {t.name: name for name, tensors in zip(names, shards) for t in tensors},
        }
        (work.path / SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (work.path / "config.json").write_text(json.dumps(_hf_config_json(config), indent=2) + "\n")
        generation = {
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "transformers_version": transformers.__version__,
        }
        (work.path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for file in TOKENIZER_FILES:
            shutil.copy(TOKENIZER_DIR / file, work.path / file)
        work.commit()
    return Path(out)


def add_arguments(parser) -> None:
    parser.add_argument(
        "preset", choices=sorted(PRESETS), help="the real model whose shape to copy"
    )
    parser.add_argument("out", type=Path, help="output directory (Hugging Face checkpoint)")
    parser.add_argument(
        "--layers", type=int, default=None, help="keep only the first N decoder layers"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args) -> int:
    start = time.perf_counter()
    try:
        out = write_random_model(
            args.preset, args.out, args.layers, args.seed, overwrite=args.overwrite
        )
    except (RandomModelError, OSError) as e:
        print(f"d2moe random-model: error: {e}", file=sys.stderr)
        return 1
    config = json.loads((out / "config.json").read_text())
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(
        f"wrote {out}: {args.preset} with {config['num_hidden_layers']} layers, "
        f"{size / 1e9:.2f} GB bf16, in {time.perf_counter() - start:.0f} s"
    )
    return 0
