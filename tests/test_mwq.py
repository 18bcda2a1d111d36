"""MWQ quantizer, bit packing and blob layout against a float64 reference.

Tolerances: the packed quantizer reconstructs in float32 while the reference
below works in float64 from the same float16 base scales and coded plane scales
(exact in float32), so the two agree to float32 rounding (relative 1e-6 of the
matrix norm).
"""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_d2moe.experts import shard_expert
from vllm_d2moe.mwq.bitpack import pack_bits, unpack_bits
from vllm_d2moe.mwq.checkpoint import CheckpointError, MWQCheckpoint, OutdatedFormatError
from vllm_d2moe.mwq.layout import ExpertLayout
from vllm_d2moe.mwq.plane_scales import (
    RATIOS,
    decode_plane_scales,
    decode_table,
    encode_plane_scales,
    pack_codes,
    unpack_codes,
)
from vllm_d2moe.mwq.quantize import MWQError, MWQSpec, dequantize, quantize


def coded_scale(mean: torch.Tensor, s: torch.Tensor, plane: int) -> torch.Tensor:
    """float64: the value nearest to ``mean`` among ``s * RATIOS * 2**-(plane + 2)`` (first on ties)."""
    candidates = s * torch.tensor(RATIOS, dtype=torch.float64) * 2.0 ** -(plane + 2)
    return candidates.gather(-1, (candidates - mean).abs().argmin(-1, keepdim=True))


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
    for j, _ in enumerate(spec.widths[1:]):
        sign = torch.where(residual >= 0, 1.0, -1.0).double()
        a = coded_scale(residual.abs().mean(-1, keepdim=True), s, j)
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


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 7),
    plane=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_plane_scale_codes_round_trip(rows, groups, plane, seed):
    """Codes are the nearest table entry, pack two per byte and decode (float32, kernels' table) exactly
    to the float64 values the quantizer fits with."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(rows, groups, generator=g, dtype=torch.float64) * 0.1 + 1e-4).half()
    ratio = torch.rand(rows, groups, generator=g, dtype=torch.float64) * 2.2 - 0.1  # beyond both ends
    mean = (s.double() * ratio * 2.0 ** -(plane + 2)).clamp(min=0)
    codes, decoded = encode_plane_scales(mean, s, plane)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 16
    assert torch.equal(decoded, coded_scale(mean.unsqueeze(-1), s.double().unsqueeze(-1), plane)[..., 0])
    packed = pack_codes(codes)
    assert packed.shape == (rows, (groups + 1) // 2)
    assert torch.equal(unpack_codes(packed, groups), codes)
    assert torch.equal(decode_plane_scales(codes, s, plane).double(), decoded)
    table = decode_table(plane + 1)
    assert torch.equal((s.float() * table[plane][codes.long()]).double(), decoded)


def test_zero_residual_gets_zero_scale():
    """A group the base reconstructs exactly (a constant one) keeps its residual at zero."""
    w = torch.full((3, 32), 0.3)
    w[1] = torch.arange(32) % 4 * 0.25  # on the 2-bit grid
    q = quantize(w, MWQSpec(2, 8, 32))
    for _, codes in q.planes:
        assert torch.equal(unpack_codes(codes, 1)[1], torch.zeros(1, dtype=torch.uint8))
    assert torch.equal(dequantize(q)[1], w[1])


# Bits per weight counted from the stored bytes: every piece of an expert's width-b prefix,
# alignment padding included, over its weights.
@pytest.mark.parametrize(
    "hidden,inter",
    # OLMoE, Mixtral, reference-small; Qwen1.5-MoE (11 groups per down row) and a one-group row
    # pad a nibble per row and plane.
    [(2048, 1024), (4096, 14336), (256, 512), (2048, 1408), (256, 128)],
)
def test_bits_per_weight_per_width(hidden, inter):
    layout = ExpertLayout(MWQSpec(2, 8, 128), hidden=hidden, intermediate=inter)
    weights = 3 * hidden * inter
    bits = {b: 8 * layout.nbytes(b) / weights for b in range(2, 9)}
    if inter % 256 == 0:  # even groups: 2 + 0.25 (float16 scale and zero per 128) + per plane 1 + 4/128
        assert bits == {b: 2.25 + (b - 2) * (1 + 4 / 128) for b in range(2, 9)}
    assert bits[8] <= 8.5  # llama.cpp q8_0
    assert bits[4] < 4.84  # llama.cpp q4_K_M


def test_old_format_is_refused_with_a_reconvert_message(tmp_path):
    index = tmp_path / "d2moe" / "index.json"
    index.parent.mkdir()
    index.write_text('{"format_version": 1, "spec": {"min_bits": 2, "max_bits": 8, "group_size": 128}, "layers": {}}')
    with pytest.raises(OutdatedFormatError, match=r"format version 1 is outdated .*re-convert the model"):
        MWQCheckpoint(tmp_path)
    index.write_text('{"format_version": 99, "spec": {"min_bits": 2, "max_bits": 8, "group_size": 128}, "layers": {}}')
    with pytest.raises(CheckpointError, match="format version 99 is not supported"):
        MWQCheckpoint(tmp_path)


def test_demo_converts_its_outdated_cache_again(tmp_path, capsys):
    """``d2moe demo`` keeps its converted cache, but one in an older format is converted again."""
    from vllm_d2moe.demo import converted_checkpoint
    from vllm_d2moe.testing.tiny_models import make_tiny_model

    hf = make_tiny_model("mixtral", tmp_path / "hf")
    spec = MWQSpec(2, 4, 64)
    dst = converted_checkpoint(hf, tmp_path / "work", spec)
    index = dst / "d2moe" / "index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "format_version": 1}))
    with pytest.raises(OutdatedFormatError):
        MWQCheckpoint(dst)
    assert converted_checkpoint(hf, tmp_path / "work", spec) == dst
    assert "format version 1 is outdated" in capsys.readouterr().out
    assert MWQCheckpoint(dst).verify() > 0
