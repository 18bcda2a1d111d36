"""Tiny random-weight Hugging Face MoE models, one per supported architecture.

Each model is a real transformers checkpoint (``config.json``, safetensors
weights, a byte-level BPE tokenizer with ``<s>``/``</s>``) that transformers
and vLLM load like any hub model, but small enough (hidden 128, 2-3 layers,
8 experts) to build, convert and serve in seconds on a CPU. Hidden and expert
widths are multiples of 64 and 128 so that both group sizes divide them.
"""

import importlib
from pathlib import Path

import torch
import transformers

from vllm_d2moe.reference.tokenizer import BOS_ID, EOS_ID, save_tokenizer, train_tokenizer

VOCAB_SIZE = 512
MAX_POSITIONS = 1024

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_POSITIONS,
    num_experts_per_tok=2,
    # Random models predict nearly uniformly; a larger init widens the gap
    # between the top tokens (median top-2 log-prob gap ~0.25 vs ~0.05 at the
    # default 0.02), so greedy outputs are less sensitive to rounding.
    initializer_range=0.1,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=None,
    tie_word_embeddings=False,
    dtype="bfloat16",
)

# Per-architecture config class and the fields that differ from _COMMON.
_ARCHS = {
    "mixtral": (
        transformers.MixtralConfig,
        dict(intermediate_size=256, num_local_experts=8, head_dim=32),
    ),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        dict(
            intermediate_size=256,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=256,
            num_experts=8,
        ),
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        dict(intermediate_size=256, moe_intermediate_size=128, num_experts=8, norm_topk_prob=True),
    ),
    "olmoe": (
        transformers.OlmoeConfig,
        dict(intermediate_size=128, num_experts=8),
    ),
    "deepseek_v2": (
        transformers.DeepseekV2Config,
        dict(
            # Three layers: one dense MLP layer (first_k_dense_replace) and two MoE layers.
            num_hidden_layers=3,
            first_k_dense_replace=1,
            intermediate_size=256,
            moe_intermediate_size=128,
            n_routed_experts=8,
            n_shared_experts=1,
            num_key_value_heads=4,
            q_lora_rank=None,
            # vLLM always routes DeepSeek-V2 with grouped top-k; one group is plain top-k.
            n_group=1,
            topk_group=1,
            # vLLM's CPU MLA kernel is compiled only for a 512 + 64 latent cache.
            kv_lora_rank=512,
            qk_rope_head_dim=64,
            qk_nope_head_dim=64,
            v_head_dim=64,
        ),
    ),
}

SUPPORTED_TINY_ARCHS = tuple(_ARCHS)

# Offline training text for the tokenizer: Python standard library sources.
_TOKENIZER_TEXT_MODULES = (
    "argparse",
    "collections",
    "json.decoder",
    "pathlib",
    "textwrap",
    "typing",
)


def tiny_config(arch: str, **overrides) -> transformers.PretrainedConfig:
    """The config of the tiny ``arch`` model, with ``overrides`` applied."""
    if arch not in _ARCHS:
        raise ValueError(
            f"no tiny model for {arch!r}; available: {', '.join(SUPPORTED_TINY_ARCHS)}"
        )
    config_class, fields = _ARCHS[arch]
    return config_class(**{**_COMMON, **fields, **overrides})


def _tokenizer_texts() -> list[str]:
    return [
        Path(importlib.import_module(name).__file__).read_text(encoding="utf-8")
        for name in _TOKENIZER_TEXT_MODULES
    ]


def make_tiny_model(
    arch: str, out_dir: str | Path, seed: int = 0, max_shard_size: str = "5GB", **overrides
) -> Path:
    """Build, save and return the directory of a tiny random ``arch`` model.

    ``overrides`` replace config fields (e.g. ``num_hidden_layers=3``,
    ``dtype="float32"``); a small ``max_shard_size`` (e.g. ``"100KB"``) gives a
    sharded checkpoint with ``model.safetensors.index.json``.
    """
    config = tiny_config(arch, **overrides)
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tokenizer = train_tokenizer(_tokenizer_texts(), VOCAB_SIZE, MAX_POSITIONS)
    save_tokenizer(tokenizer, out_dir)
    return out_dir
