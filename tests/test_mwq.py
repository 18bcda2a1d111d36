"""MWQ quantizer, bit packing and blob layout against a float64 reference.

Tolerances: the packed quantizer reconstructs in float32 while the reference
below works in float64 from the same float16 scales, so the two agree to
float32 rounding (relative 1e-6 of the matrix norm).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_d2moe.experts import shard_expert
from vllm_d2moe.mwq.bitpack import pack_bits, unpack_bits
from vllm_d2moe.mwq.layout import ExpertLayout
from vllm_d2moe.mwq.quantize import MWQError, MWQSpec, dequantize, quantize


def reference_mwq(w: torch.Tensor, spec: MWQSpec) -> list[torch.Tensor]:
    """Float64 reconstructions at every width, straight from the module docstring's formulas."""
    rows, cols = w.shape
    g = spec.group_size
    x = w.double().reshape(rows, cols // g, g)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s = ((hi - lo) / (2**spec.min_bits - 1)).half().double()
    s[s == 0] = 1.0
    z = (-lo / s).half().double()
    q = torch.clamp(torch.round(x / s + z), 0, 2**spec.min_bits - 1)
    recon = s * (q - z)
    out = [recon.reshape(rows, cols)]
    residual = x - recon
    for _ in spec.widths[1:]:
        sign = torch.where(residual >= 0, 1.0, -1.0).double()
        a = residual.abs().mean(-1, keepdim=True).half().double()
        recon = recon + a * sign
        residual = residual - a * sign
        out.append(recon.reshape(rows, cols))
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double())).item()


def heavy_tailed(rows, cols):
    return torch.distributions.StudentT(2.0).sample((rows, cols)) * 0.02


@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed"])
@pytest.mark.parametrize("min_bits,max_bits,group", [(2, 8, 128), (1, 4, 32), (3, 6, 64), (4, 4, 16)])
def test_matches_float64_reference_and_error_decreases(kind, min_bits, max_bits, group):
    torch.manual_seed(min_bits * 100 + max_bits * 10 + group)
    w = torch.randn(96, 256) * 0.02 if kind == "gaussian" else heavy_tailed(96, 256)
    spec = MWQSpec(min_bits, max_bits, group)
    q = quantize(w, spec)
    reference = reference_mwq(w, spec)
    errors = []
    for bits, ref in zip(spec.widths, reference):
        got = dequantize(q.truncate(bits))
        assert rel_err(got, ref) < 1e-6
        errors.append(rel_err(got, w))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors


def test_width_8_error_at_most_one_percent():
    torch.manual_seed(1)
    for shape in [(256, 1024), (1024, 256), (64, 4096)]:
        w = torch.randn(shape) * 0.02
        err = rel_err(dequantize(quantize(w, MWQSpec(2, 8, 128))), w)
        assert err <= 0.01, (shape, err)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 20),
    groups=st.integers(1, 4),
    group=st.sampled_from([3, 8, 16, 24]),
    min_bits=st.integers(1, 8),
    extra=st.integers(0, 7),
    seed=st.integers(0, 2**16),
)
def test_nested_view_equals_direct_quantization(rows, groups, group, min_bits, extra, seed):
    max_bits = min(8, min_bits + extra)
    w = torch.randn(rows, groups * group, generator=torch.Generator().manual_seed(seed))
    full = quantize(w, MWQSpec(min_bits, max_bits, group))
    for bits in range(min_bits, max_bits + 1):
        direct = quantize(w, MWQSpec(min_bits, bits, group))
        assert torch.equal(dequantize(full.truncate(bits)), dequantize(direct))


def test_odd_shapes_and_bad_options():
    w = torch.randn(7, 60)  # columns not a multiple of 8: packed rows are padded
    q = quantize(w, MWQSpec(2, 5, 12))
    assert dequantize(q).shape == (7, 60)
    assert rel_err(dequantize(q), w) < rel_err(dequantize(q.truncate(2)), w)
    one_row = quantize(torch.randn(1, 128), MWQSpec(2, 8, 128))
    assert dequantize(one_row).shape == (1, 128)
    with pytest.raises(MWQError, match=r"w2: group size 128 does not divide its input dimension 200"):
        quantize(torch.randn(4, 200), MWQSpec(group_size=128), name="w2")
    with pytest.raises(MWQError, match="1 <= min_bits <= max_bits <= 8"):
        MWQSpec(3, 2)
    with pytest.raises(MWQError, match="1 <= min_bits <= max_bits <= 8"):
        MWQSpec(2, 9)
    with pytest.raises(MWQError, match="NaN"):
        quantize(torch.tensor([[float("nan")] * 8]), MWQSpec(2, 4, 8))
    with pytest.raises(MWQError, match="outside"):
        q.truncate(6)
    constant = quantize(torch.full((2, 16), 0.5), MWQSpec(2, 4, 16))
    assert torch.allclose(dequantize(constant), torch.full((2, 16), 0.5), atol=1e-3)


@settings(max_examples=30, deadline=None)
@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 40)), seed=st.integers(0, 2**16))
def test_bitpack_round_trip(shape, seed):
    bits = torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_bits(bits)
    assert packed.shape == (shape[0], (shape[1] + 7) // 8)
    assert torch.equal(unpack_bits(packed, shape[1]), bits)


def _expert(spec, hidden, inter, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "gate_up": quantize(torch.randn(2 * inter, hidden, generator=g), spec),
        "down": quantize(torch.randn(hidden, inter, generator=g), spec),
    }


def test_layout_round_trip_and_prefixes():
    spec = MWQSpec(2, 6, 32)
    layout = ExpertLayout(spec, hidden=64, intermediate=96)
    tensors = _expert(spec, 64, 96)
    blob = layout.encode(tensors)
    assert blob.numel() == layout.blob_nbytes
    for bits in spec.widths:
        prefix = blob[: layout.nbytes(bits)].clone()  # only the width-b prefix exists
        decoded = layout.decode(prefix, bits)
        for proj in ("gate_up", "down"):
            assert torch.equal(dequantize(decoded[proj]), dequantize(tensors[proj].truncate(bits)))
    sizes = [layout.nbytes(b) for b in spec.widths]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    with pytest.raises(MWQError, match="width 4 needs"):
        layout.decode(blob[: layout.nbytes(3)], 4)


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tensor_parallel_shards_reassemble(tp_size):
    spec = MWQSpec(2, 4, 16)
    hidden, inter = 32, 128
    tensors = _expert(spec, hidden, inter, seed=3)
    full_gate_up, full_down = dequantize(tensors["gate_up"]), dequantize(tensors["down"])
    part = inter // tp_size
    for rank in range(tp_size):
        shard = shard_expert(tensors, rank, tp_size)
        rows = list(range(rank * part, (rank + 1) * part))
        rows += [inter + r for r in rows]
        assert torch.equal(dequantize(shard.gate_up), full_gate_up[rows])
        assert torch.equal(dequantize(shard.down), full_down[:, rank * part : (rank + 1) * part])
    with pytest.raises(MWQError, match="split"):
        shard_expert(_expert(MWQSpec(2, 4, 16), hidden, 48), 0, 2)
