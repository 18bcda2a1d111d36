"""The unquantized model's held-out perplexity from a plain transformers forward
pass, to check vLLM's prompt-logprob scoring against (same windows, same dtype)."""

from pathlib import Path

import torch
import transformers

from vllm_d2moe.token_windows import perplexity

# vLLM and transformers must agree this closely (relative perplexity difference).
TOLERANCE = 0.005


def transformers_perplexity(model_dir: str | Path, windows: torch.Tensor, dtype: str) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    return perplexity(model, windows)
