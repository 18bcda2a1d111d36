"""quantize_float32 writes exactly the float64 reference's bytes, on fresh random inputs."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_d2moe.mwq.quantize import MWQError, MWQSpec, quantize, quantize_float32


def assert_same_bytes(expected, actual):
    assert torch.equal(expected.base_bits, actual.base_bits)
    assert torch.equal(expected.base_scale.view(torch.int16), actual.base_scale.view(torch.int16))
    assert torch.equal(expected.base_zero.view(torch.int16), actual.base_zero.view(torch.int16))
    assert len(expected.planes) == len(actual.planes)
    for j, ((eb, es), (ab, as_)) in enumerate(zip(expected.planes, actual.planes)):
        assert torch.equal(eb, ab), f"plane {j} bits"
        assert torch.equal(es, as_), f"plane {j} scale codes"


# Weight distributions that stress different decisions: plain normal weights, heavy
# tails, an offset (all-positive groups, large zero points), weights on a coarse grid
# (exact ties and zero residuals), constant runs, and signed zeros.
def _weights(kind: str, rows: int, cols: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    if kind == "heavy":
        w = w * torch.exp(torch.randn(rows, cols, generator=g) * 2)
    elif kind == "offset":
        w = w.abs() + 0.5
    elif kind == "grid":
        w = torch.round(w * 200) / 64
    elif kind == "constant":
        w[:, : cols // 2] = 0.25
        w[: rows // 2, cols // 2 :] = -0.0
    return w.to(dtype)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["normal", "heavy", "offset", "grid", "constant"]),
    rows=st.integers(1, 37),
    groups=st.integers(1, 5),
    group_size=st.sampled_from([8, 16, 24, 64, 128]),
    min_bits=st.integers(1, 8),
    extra_bits=st.integers(0, 7),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_float32_equals_float64_reference(
    kind, rows, groups, group_size, min_bits, extra_bits, dtype, seed
):
    spec = MWQSpec(min_bits, min(8, min_bits + extra_bits), group_size)
    w = _weights(kind, rows, groups * group_size, seed, dtype)
    assert_same_bytes(quantize(w, spec), quantize_float32(w, spec))


@pytest.mark.parametrize("bits", range(2, 9))
def test_every_width_on_expert_sized_matrices(bits):
    """Widths 2..8 as the minimum, the maximum 8, on a [2I, H] matrix; few groups need the
    float64 reference."""
    spec = MWQSpec(bits, 8, 128)
    w = _weights("normal", 512, 1024, bits, torch.bfloat16)
    counts = {}
    assert_same_bytes(quantize(w, spec), quantize_float32(w, spec, counts=counts))
    assert counts["groups"] == 512 * 8
    assert counts["recomputed"] / counts["groups"] < 0.03


def test_other_inputs_use_the_reference():
    """float32 sources, and group sizes not a multiple of 8, go through the reference."""
    w = _weights("normal", 8, 96, 1, torch.float32)
    assert_same_bytes(quantize(w, MWQSpec(2, 5, 32)), quantize_float32(w, MWQSpec(2, 5, 32)))
    w16 = w.to(torch.bfloat16)
    assert_same_bytes(quantize(w16, MWQSpec(2, 5, 12)), quantize_float32(w16, MWQSpec(2, 5, 12)))


def test_bad_input_is_named():
    w = _weights("normal", 4, 256, 2, torch.bfloat16)
    w[3, 200] = float("nan")
    with pytest.raises(MWQError, match="experts.3.down: contains NaN"):
        quantize_float32(w, MWQSpec(), name="experts.3.down")
    huge = torch.full((2, 128), 60000.0, dtype=torch.bfloat16)
    huge[1, 5] = -60000.0
    with pytest.raises(MWQError, match="w: group 0 of row 1 spans .*overflows float16"):
        quantize_float32(huge, MWQSpec(1, 4, 128), name="w")
    with pytest.raises(MWQError, match="w: group 0 of row 1 spans .*overflows float16"):
        quantize(huge, MWQSpec(1, 4, 128), name="w")
