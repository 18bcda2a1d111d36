"""Baseline quantizers, applied as "fake quantization" to a Hugging Face checkpoint.

A fake-quantized checkpoint is the source checkpoint with every routed-expert
weight replaced by its dequantized value (in the source dtype) and everything
else copied unchanged. vLLM serves it as an ordinary unquantized model, so its
accuracy is exactly that of the quantizer: accuracy depends only on the weights,
not on the kernel that would read packed codes.

* :func:`rtn_fake_quantize`: independent ("matryoshka-free") round-to-nearest at
  one width: group-wise asymmetric min-max with float16 scale and zero, i.e.
  MWQ's base quantizer used at that width directly, with no nesting.
* :func:`int8_fake_quantize`: symmetric per-channel INT8, one float16 scale per
  output row (``max |W[r]| / 127``), codes in ``[-127, 127]``.
"""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_d2moe.converters.architectures import architecture
from vllm_d2moe.converters.convert import WEIGHT_SUFFIXES
from vllm_d2moe.mwq.quantize import SCALE_DTYPE, MWQSpec, dequantize, quantize

FakeQuantizer = Callable[[torch.Tensor], torch.Tensor]  # 2-D weight -> dequantized float32
INT8_LEVELS = 127


def rtn_fake_quantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest at ``bits``: MWQ with ``min_bits == max_bits`` has no residual planes."""
    return dequantize(quantize(weight, MWQSpec(bits, bits, group_size)))


def int8_fake_quantize(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach().to(torch.float64)
    scale = (w.abs().amax(dim=1, keepdim=True) / INT8_LEVELS).to(SCALE_DTYPE)
    # An all-zero row has no range; any positive scale reconstructs it.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).double()
    codes = torch.clamp(torch.round(w / scale), -INT8_LEVELS, INT8_LEVELS)
    return (codes * scale).float()


def _fake_quantize_tensor(tensor: torch.Tensor, fake_quantize: FakeQuantizer) -> torch.Tensor:
    """A per-expert 2-D matrix, or a fused ``[experts, rows, cols]`` tensor expert by expert."""
    matrices = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor
    out = torch.stack([fake_quantize(m) for m in matrices]).to(tensor.dtype)
    return out.reshape(tensor.shape)


def write_fake_quantized(src: str | Path, dst: str | Path, fake_quantize: FakeQuantizer) -> int:
    """Write ``src`` with its routed experts fake-quantized to ``dst``; return how many
    expert tensors were replaced.

    Routed experts are recognised by the converter's per-architecture naming, so
    exactly the tensors ``d2moe convert`` quantizes are replaced (shared experts,
    dense MLPs and layers past ``num_hidden_layers`` stay as they are).
    """
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    arch = architecture(config.get("model_type"))
    dst.mkdir(parents=True, exist_ok=True)
    replaced = 0
    for path in sorted(src.iterdir()):
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata()
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            for name, tensor in tensors.items():
                expert = arch.classify(name)
                if expert is not None and expert.layer < config["num_hidden_layers"]:
                    tensors[name] = _fake_quantize_tensor(tensor, fake_quantize)
                    replaced += 1
            save_file(tensors, str(dst / path.name), metadata)
        elif path.is_file() and path.suffix not in WEIGHT_SUFFIXES:
            # config, tokenizer, shard index, generation config, ...
            shutil.copy2(path, dst / path.name)
    if not replaced:
        raise ValueError(f"{src}: no routed-expert tensors found to quantize")
    return replaced
