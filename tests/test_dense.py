"""The ``dense`` option: non-expert layers as weight-only int8 / int4 (vllm_glue/dense_method.py)."""

import pytest
import torch
from vllm import _custom_ops as ops
from vllm.model_executor.layers.linear import QKVParallelLinear, ReplicatedLinear, UnquantizedLinearMethod
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from vllm_d2moe.vllm_glue.dense_method import (
    DenseLinearMethod,
    DenseLMHeadMethod,
    _quantize_layer,
    check_dense_mode,
    dense_quant_method,
    quantize_int4_groups,
    quantize_int8_rows,
)

# Relative error of the packed matmuls against float64 products of the same quantized weights:
# float32 accumulation for float32 activations; bfloat16 rounds activations, scales and outputs.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _layer(weight: torch.Tensor) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    return layer


def _quantized(mode: str, weight: torch.Tensor, prefix: str) -> tuple[torch.nn.Module, DenseLinearMethod]:
    """A layer holding ``weight`` after ``mode``'s method processed it, and the method."""
    layer = _layer(weight)
    method = DenseLinearMethod(mode, prefix)
    method.process_weights_after_loading(layer)
    return layer, method


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _dequantized_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """float64 weights the int4 format stores, recomputed from its definition (min/max per group)."""
    rows, cols = weight.shape
    _, scales_and_zeros = quantize_int4_groups(weight, group_size)
    scale = scales_and_zeros[..., 0].t().double()[..., None]
    zero = scales_and_zeros[..., 1].t().double()[..., None]
    # The codes as the format defines them, in float32 as stored (float64 division rounds some ties otherwise).
    g32 = weight.float().view(rows, cols // group_size, group_size)
    lo = g32.amin(dim=-1, keepdim=True)
    step = ((g32.amax(dim=-1, keepdim=True) - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round((g32 - lo) / step).clamp(0, 15).double()
    return ((q - 8) * scale + zero).view(rows, cols)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 96), (64, 256), (5, 32)])
@pytest.mark.parametrize("leading", [(1,), (7,), (2, 3)])
def test_int8_layer_matches_float64_product_of_its_weights(dtype, shape, leading):
    weight = torch.randn(shape, dtype=dtype) * 0.05
    bias = torch.randn(shape[0], dtype=dtype)
    layer, method = _quantized("int8", weight, "model.layers.0.self_attn.o_proj")
    assert method.quantized and layer.dense_weight.dtype == torch.int8 and layer.weight.numel() == 0

    q, scale = quantize_int8_rows(weight)
    # Round to nearest: no weight is further than half a step from its code.
    assert (weight.double() - q.double() * scale.double()[:, None]).abs().le(scale.double()[:, None] / 2 + 1e-6).all()
    x = torch.randn(*leading, shape[1], dtype=dtype)
    out = method.apply(layer, x, bias)
    ref = x.double() @ (q.double() * scale.double()[:, None]).t() + bias.double()
    assert out.shape == (*leading, shape[0]) and out.dtype == dtype
    assert _relative_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols,group_size", [(256, 128), (96, 32), (320, 64)])
def test_int4_layer_matches_float64_product_of_its_weights(dtype, cols, group_size):
    weight = torch.randn(48, cols, dtype=dtype) * 0.05
    layer, method = _quantized("int4", weight, "model.layers.1.mlp.down_proj")
    assert method.quantized and layer.dense_group_size == group_size

    dequantized = _dequantized_int4(weight, group_size)
    groups = weight.double().view(48, cols // group_size, group_size)
    step = (groups.amax(dim=-1) - groups.amin(dim=-1)) / 15
    error = (weight.double() - dequantized).view_as(groups).abs()
    # Half a step, plus the rounding of the stored scale and zero to the weights' dtype.
    slack = 1e-6 if dtype == torch.float32 else 8 * 2**-8 * groups.abs().amax(dim=-1)
    assert error.le((step / 2 + slack)[..., None]).all()
    x = torch.randn(6, cols, dtype=dtype)
    assert _relative_error(method.apply(layer, x), x.double() @ dequantized.t()) < TOLERANCE[dtype]


@pytest.mark.skipif(not ops._supports_onednn, reason="w8a8 needs vLLM's oneDNN kernels (x86-64 CPU builds have them)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 96), (64, 256), (5, 32)])
@pytest.mark.parametrize("tokens", [1, 7])
def test_w8a8_layer_matches_float64_product_within_its_activation_rounding(dtype, shape, tokens):
    weight = torch.randn(shape, dtype=dtype) * 0.05
    bias = torch.randn(shape[0], dtype=dtype)
    layer, method = _quantized("w8a8", weight, "model.layers.0.self_attn.qkv_proj")
    assert method.quantized and layer.weight.numel() == 0
    # The scales oneDNN reads stay on the layer; churn memory so that a dangling pointer would show.
    scratch = [torch.full((256, 256), 77.0) for _ in range(8)]
    q, scale = quantize_int8_rows(weight)
    x = torch.randn(tokens, shape[1], dtype=dtype)
    out = method.apply(layer, x)
    del scratch
    # Activations rounded per token to int8 (at most half a step of max|x| / 127 each): the product's
    # relative error is about 1 / (127 sqrt(3)), 0.5 %, on Gaussian inputs; bfloat16 adds its own rounding.
    weights = q.double() * scale.double()[:, None]
    ref = x.double() @ weights.t()
    assert out.shape == (tokens, shape[0]) and out.dtype == dtype
    assert _relative_error(out, ref) < 2e-2
    # The activations' rounding is all there is: the same product of int8-rounded inputs is exact.
    step = x.double().abs().amax(dim=1, keepdim=True) / 127
    rounded = torch.round(x.double() / step) * step
    assert _relative_error(out, rounded @ weights.t()) < TOLERANCE[dtype]
    with_bias = method.apply(layer, x, bias)
    torch.testing.assert_close(with_bias, (out.double() + bias.double()).to(dtype))


@pytest.mark.parametrize("mode", ["int8", "int4", "w8a8"])
def test_a_layer_whose_input_size_is_not_a_multiple_of_32_keeps_its_weights(mode):
    weight = torch.randn(16, 70)
    layer = _layer(weight)
    assert not _quantize_layer(layer, mode, "model.layers.0.self_attn.o_proj")
    assert torch.equal(layer.weight, weight)


def test_router_gates_and_tied_heads_stay_unquantized():
    linear = object.__new__(QKVParallelLinear)  # isinstance is all the dispatch looks at
    gate = object.__new__(ReplicatedLinear)
    head = object.__new__(ParallelLMHead)
    assert isinstance(dense_quant_method("int8", linear, "model.layers.0.self_attn.qkv_proj"), DenseLinearMethod)
    assert type(dense_quant_method("int8", gate, "model.layers.0.block_sparse_moe.gate")) is UnquantizedLinearMethod
    assert type(dense_quant_method(None, linear, "model.layers.0.self_attn.qkv_proj")) is UnquantizedLinearMethod
    assert dense_quant_method(None, head, "lm_head") is None
    method = dense_quant_method("int4", head, "lm_head")
    assert isinstance(method, DenseLMHeadMethod)

    embedding = _layer(torch.randn(64, 128))
    tied = _layer(torch.randn(64, 128))
    method.tie_weights(tied, embedding)
    method.process_weights_after_loading(tied)
    assert not method.quantized and tied.weight is embedding.weight


def test_an_unknown_mode_is_refused_naming_the_option():
    with pytest.raises(ValueError, match="'dense' must be one of \\['int8', 'int4', 'w8a8'\\], got 'fp8'"):
        check_dense_mode("fp8")
