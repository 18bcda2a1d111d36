"""int8 / int4 for the layers that are not routed experts (``dense`` option).

Attention projections, shared experts, dense MLPs and the output head are
quantized once after loading and multiplied by torch's packed CPU matmuls,
weight-only (activations stay in the model's dtype): ``int8``
(``_weight_int8pack_mm``, one scale per output row) and ``int4``
(``_weight_int4pack_mm_for_cpu``, asymmetric per group of input columns); or
``w8a8``: the same int8 weights through vLLM's own oneDNN int8 GEMM, each
token's activations quantized to int8 on the fly (symmetric, one scale per
token), as vLLM serves W8A8 checkpoints on CPUs. torch's weight-only kernels
are matrix-vector loops that slow down with every token of a batch; oneDNN's
int8 GEMM does not (``benchmarks/results/dense.md``). Router gates stay
unquantized: they are tiny and decide which experts run.
"""

import logging

import torch
from vllm import _custom_ops as ops
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod

logger = logging.getLogger(__name__)

DENSE_MODES = ("int8", "int4", "w8a8")
# Layers named like this (the last part of vLLM's prefix) keep their unquantized method.
GATE_NAMES = frozenset({"gate", "shared_expert_gate"})
# Input columns per int4 scale group, the first that divides a layer's input size.
_INT4_GROUP_SIZES = (128, 64, 32)


def check_dense_mode(mode) -> str | None:
    if mode is not None and mode not in DENSE_MODES:
        raise ValueError(f"d2moe option 'dense' must be one of {list(DENSE_MODES)}, got {mode!r}")
    if mode == "w8a8" and not ops._supports_onednn:
        raise ValueError("d2moe option 'dense': 'w8a8' runs on vLLM's oneDNN int8 GEMM, which this vLLM build "
                         "lacks; use 'int8' (weight-only)")
    return mode


def dense_quant_method(mode: str | None, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
    """The method of ``layer`` (not a routed-expert layer) under ``dense: mode``; None leaves vLLM's default."""
    if isinstance(layer, LinearBase):
        if mode is None or prefix.rsplit(".", 1)[-1] in GATE_NAMES:
            return UnquantizedLinearMethod()
        return DenseLinearMethod(mode, prefix)
    if isinstance(layer, ParallelLMHead) and mode is not None:
        return DenseLMHeadMethod(mode, prefix)
    return None


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 ``[N, K]`` and one scale per row (in ``weight``'s dtype), from ``weight [N, K]``."""
    w = weight.float()
    exact = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    # Stored in the weights' dtype, rounded up so that every row's largest weight stays within 127 steps.
    scale = exact.to(weight.dtype)
    scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 of ``weight [N, K]`` per ``group_size`` columns, packed for
    ``_weight_int4pack_mm_for_cpu``, and its ``[K / group_size, N, 2]`` scales and zeros:
    a weight is ``(q - 8) * scale + zero`` with ``q`` in 0..15."""
    rows, cols = weight.shape
    groups = weight.float().view(rows, cols // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp_(0, 15)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(rows, cols).to(torch.int32), 1)
    scales_and_zeros = torch.stack([scale.t(), (lo + 8 * scale).t()], dim=-1).to(weight.dtype).contiguous()
    return packed, scales_and_zeros


def _matmul(layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1]).to(layer.weight.dtype)
    if layer.dense_mode == "w8a8":
        x_q, x_scale, _ = ops.onednn_scaled_int8_quant(x2d.contiguous(), None, None, True)
        out = torch.empty((x2d.shape[0], layer.dense_handler.n), dtype=x2d.dtype)
        ops.onednn_scaled_mm(layer.dense_handler, x_q, out, x_scale, None, None, None)
    elif layer.dense_mode == "int8":
        out = torch.ops.aten._weight_int8pack_mm(x2d, layer.dense_weight, layer.dense_scales)
    else:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2d, layer.dense_weight, layer.dense_group_size, layer.dense_scales
        )
    out = out.to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _quantize_layer(layer: torch.nn.Module, mode: str, name: str) -> bool:
    """Replace ``layer.weight`` by its ``mode`` form; False (layer untouched) when its shape does not allow it."""
    weight = layer.weight.data
    if weight.ndim != 2 or weight.shape[1] % _INT4_GROUP_SIZES[-1]:
        # torch's packed matmuls need whole groups; its bfloat16 int8 kernel also computes wrong sums
        # (and can crash) for an input size that is not a multiple of 16 (torch 2.13, K = 70).
        logger.info("d2moe dense %s: %s keeps its %s weights (input size %d is not a multiple of %d)",
                    mode, name, weight.dtype, weight.shape[-1], _INT4_GROUP_SIZES[-1])
        return False
    if mode == "int4":
        group_size = next(g for g in _INT4_GROUP_SIZES if weight.shape[1] % g == 0)
        layer.dense_weight, layer.dense_scales = quantize_int4_groups(weight, group_size)
        layer.dense_group_size = group_size
    elif mode == "w8a8":
        q, scale = quantize_int8_rows(weight)
        # oneDNN keeps a packed copy of the weights but reads the scales where they are: they stay on the layer.
        layer.dense_scales = scale.float().view(-1, 1).contiguous()
        layer.dense_handler = ops.create_onednn_scaled_mm(q.t(), layer.dense_scales, weight.dtype, True, False, 32)
    else:
        layer.dense_weight, layer.dense_scales = quantize_int8_rows(weight)
    layer.dense_mode = mode
    # The full-precision weight is no longer needed; an empty tensor keeps the attribute vLLM reads (and the
    # dtype the matmuls take their inputs in).
    layer.weight = torch.nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=False)
    return True


class _QuantizedAfterLoading:
    """Loaded as vLLM loads the unquantized layer, then quantized to ``mode`` (the unquantized
    method's own path where :meth:`_keeps_weights` or the layer's shape says so)."""

    def __init__(self, mode: str, prefix: str):
        super().__init__()
        self.mode, self.prefix = mode, prefix
        self.quantized = False

    def _keeps_weights(self) -> bool:
        return False

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.quantized = not self._keeps_weights() and _quantize_layer(layer, self.mode, self.prefix)
        if not self.quantized:
            super().process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.quantized:
            return super().apply(layer, x, bias)
        return _matmul(layer, x, bias)


class DenseLinearMethod(_QuantizedAfterLoading, UnquantizedLinearMethod):
    """A linear layer in ``mode``."""


class DenseLMHeadMethod(_QuantizedAfterLoading, UnquantizedEmbeddingMethod):
    """The output head in ``mode``, unless it shares its weight with the input embedding."""

    tied = False

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module):
        # The embedding looks rows up in the same tensor: quantizing it would save nothing.
        self.tied = True
        return super().tie_weights(layer, embed_tokens)

    def _keeps_weights(self) -> bool:
        if self.tied:
            logger.info("d2moe dense %s: %s is tied to the input embedding and stays unquantized",
                        self.mode, self.prefix)
        return self.tied
