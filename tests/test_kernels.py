"""Every MWQ kernel backend gets the same tests against a float64 ground truth.

Ground truth: the float32 weights of ``dequantize`` (the MWQ formula),
multiplied in float64 with the inputs as given; the pure-torch reference backend
is checked against it like the others. Tolerance ``|got - want| <= tol * |want| +
tol * max|want|`` (relative to the output scale), ``tol`` by :func:`tolerance`:
``1e-4`` for float32 accumulation over at most a few hundred inputs (the
reference and CPU backends, which multiply in float32 whatever the input dtype;
the AVX-512 builds' lookup path rounds its tables to bfloat16: its segments get
:data:`LOOKUP_TOLERANCE`, and its exact arithmetic is checked projection by
projection against :func:`lookup_product`);
for the Triton backend's tensor-core dots, which round weights, inputs and the
intermediate activations to the dot dtype, about ten unit roundoffs of that
dtype: ``5e-3`` with float32 (TF32) or float16 inputs (unit roundoff 2^-11) and
``4e-2`` with bfloat16 (2^-8). Seen under the interpreter: at most 9e-4
(float16) and 1.8e-2 (bfloat16) of the output scale over 12 random layers.
Outputs are pre-filled with NaN, so a row a backend forgets to write fails. Inputs are fresh random draws per test.

The CPU backend runs as this CPU's build (``cpu_bitplanes``: AVX-512 with AVX512_BF16,
AVX-512, or AVX2, by what torch reports), and forced through ``D2MOE_CPU_ISA`` as the
AVX2 build on an AVX-512 CPU (``cpu_bitplanes:avx2``), as the AVX-512 build without
AVX512_BF16 on a CPU that has it (``cpu_bitplanes:avx512``: the lookup path adds its
bfloat16 pairs without ``vdpbf16ps``) and as the AVX-512 source on SIMDe's portable
intrinsics on a CPU without AVX-512 (``cpu_bitplanes:avx512-simde``, needs
``libsimde-dev``), so that both vector widths are tested on any x86-64 CPU.

The Triton backend runs compiled on a CUDA device when there is one, otherwise
under ``TRITON_INTERPRET=1`` on CPU tensors. The variable must hold from the
first import of triton on (vLLM, imported by other tests, loads it without), so
those cases run in a fresh process started by ``test_triton_backend_interpreted``.
"""

import importlib
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vllm_d2moe import kernels
from vllm_d2moe.experts import ExpertSegments, LayerExperts
from vllm_d2moe.kernels import cpu_bitplanes, cpu_int8
from vllm_d2moe.mwq.bitpack import unpack_bits
from vllm_d2moe.mwq.plane_scales import decode_plane_scales, unpack_codes
from vllm_d2moe.mwq.quantize import MWQError, MWQSpec, MWQTensor, dequantize, quantize
from vllm_d2moe.mwq.stacked import StackedProjection

BACKENDS = [
    "reference",
    "cpu_bitplanes",
    "cpu_bitplanes:avx2",
    "cpu_bitplanes:avx512",
    "cpu_bitplanes:avx512-simde",
    "triton_mwq",
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TENSOR_CORE_TOLERANCE = {torch.float32: 5e-3, torch.float16: 5e-3, torch.bfloat16: 4e-2}


# The lookup path's bfloat16 tables: each entry (a sum of 4 inputs less half of it) off by at most 2^-9 of itself,
# about 2e-3 RMS of a projection's output (OLMoE's expert shape, every width: benchmarks/results/kernels.md); over
# both projections of these small random MLPs, at most 7.7e-3 of the output scale was seen (the grouped and layer
# cases' lookup segments, 40 draws): 2e-2. The arithmetic itself is held to 1e-4 by the projection test.
LOOKUP_TOLERANCE = 2e-2


def tolerance(module, dtype: torch.dtype = torch.float32) -> float:
    """Allowed error relative to the output scale, for ``module``'s backend on ``dtype`` inputs."""
    return _TENSOR_CORE_TOLERANCE[dtype] if module.NAME == "triton-mwq" else 1e-4


def segment_tolerance(module, spec: MWQSpec, hidden: int, inter: int, bits: int, tokens: int) -> float:
    """:func:`tolerance`, or :data:`LOOKUP_TOLERANCE` where ``module`` runs either projection of a segment of
    ``tokens`` tokens at width ``bits`` by lookup tables (cpu_bitplanes' AVX-512 builds)."""
    plan = getattr(module, "lookup_plan", None)
    if plan is not None and tokens <= max(plan(c, spec.group_size, bits)[0] for c in (hidden, inter)):
        return LOOKUP_TOLERANCE
    return tolerance(module)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    """(backend module, device its tensors live on); ``cpu_bitplanes:ISA`` runs the CPU backend's build for ISA."""
    name, _, isa = request.param.partition(":")
    if name == "cpu_bitplanes":
        yield from cpu_build(isa)
        return
    if name != "triton_mwq":
        yield kernels.load_backend(name), torch.device("cpu")
        return
    if torch.cuda.is_available():
        yield kernels.load_backend(name), torch.device("cuda")
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        # Once vLLM (imported by other tests) has loaded triton without the
        # interpreter, interpreted kernels fail in this process.
        pytest.skip("runs in its own TRITON_INTERPRET=1 process (test_triton_backend_interpreted)")
    yield kernels.load_backend(name), torch.device("cpu")


def cpu_build(isa: str):
    """The CPU backend with ``D2MOE_CPU_ISA=isa`` (unset: the CPU's own choice) while the fixture lasts."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the CPU backend needs AVX2")
    own = cpu_bitplanes.cpu_isa()[0]
    if isa == own or (isa == "avx512-simde" and own.startswith("avx512")):
        pytest.skip(f"the cpu_bitplanes case runs this CPU's own {own} build")
    if isa == "avx512" and own == "avx2":
        pytest.skip("the AVX-512 build needs an AVX-512 CPU (avx512-simde tests its source here)")
    if isa == "avx512-simde" and not os.path.exists("/usr/include/simde/x86/avx512.h"):
        pytest.skip("the AVX-512 source without AVX-512 needs SIMDe's headers (Debian: libsimde-dev)")
    saved = os.environ.get(cpu_bitplanes.ISA_ENV)
    if isa:
        os.environ[cpu_bitplanes.ISA_ENV] = isa
    try:
        yield kernels.load_backend("cpu_bitplanes"), torch.device("cpu")
    finally:
        if saved is None:
            os.environ.pop(cpu_bitplanes.ISA_ENV, None)
        else:
            os.environ[cpu_bitplanes.ISA_ENV] = saved


def random_stacked(spec: MWQSpec, experts: int, rows: int, cols: int, device) -> StackedProjection:
    tensors = [quantize(torch.randn(rows, cols) * 0.05, spec) for _ in range(experts)]
    stacked = StackedProjection.allocate(tensors[0], experts, device)
    for e, t in enumerate(tensors):
        stacked.store(e, t)
    # Every plane scale code, not only those that random weights get (and random padding nibbles
    # where a row has an odd number of groups, which kernels must ignore).
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, stacked.plane_scale.shape, dtype=torch.uint8, generator=generator)
    stacked.plane_scale.copy_(codes.to(device))
    return stacked


def random_layer(spec: MWQSpec, experts: int, hidden: int, inter: int, device) -> tuple:
    return random_stacked(spec, experts, 2 * inter, hidden, device), random_stacked(
        spec, experts, hidden, inter, device
    )


def resident(module, projection):
    """What LayerExperts keeps for ``module``: its prepared layout, or the stacked tensors."""
    return module.prepare(projection) if hasattr(module, "prepare") else projection


def float64_mlp(x: torch.Tensor, gate_up: MWQTensor, down: MWQTensor) -> torch.Tensor:
    h = x.cpu().double() @ dequantize(gate_up.map_tensors(torch.Tensor.cpu)).double().T
    gate, up = h.chunk(2, dim=-1)
    return (F.silu(gate) * up) @ dequantize(down.map_tensors(torch.Tensor.cpu)).double().T


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert not got.isnan().any(), "rows left unwritten (still NaN)"
    torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol * want.abs().max().item())


def lookup_product(x: torch.Tensor, t: MWQTensor, two_part_planes: int) -> torch.Tensor:
    """float64 ``x @ W^T`` as the AVX-512 builds' lookup path computes it (cpu_bitplanes.cpp, lookup_tables and
    lookup_tiles): per 4 columns of a token, the 16 pattern sums of its float32 inputs added in column order,
    less half the sum of all 4, rounded to bfloat16, and for the first ``two_part_planes`` planes (base, then
    residuals) plus what that left in float32 rounded again; each plane's coefficient times its rows' selected
    entries,
    plus (offset + half the coefficients) times the group's input sum. The rows past the last whole tile of 16 are
    rebuilt: ``x @ W^T`` exactly. Only float32 accumulation separates the kernel from this."""
    (rows, cols), g, tokens = t.shape, t.group_size, x.shape[0]
    quads, pattern = x.float().reshape(tokens, cols // 4, 4), torch.arange(16)
    sums = quads[..., :1] * (pattern & 1).float()
    for k in range(1, 4):
        sums = sums + quads[..., k : k + 1] * ((pattern >> k) & 1).float()
    centred = sums - 0.5 * sums[..., 15:]
    first = centred.to(torch.bfloat16)  # tables: [tokens, cols / 4, 16]
    tables = [first.double(), first.double() + (centred - first.float()).to(torch.bfloat16).double()]
    s = t.base_scale.double()
    planes = [(t.base_bits[i], s * (1 << i)) for i in range(t.min_bits)]
    offset = -s * t.base_zero.double()
    for j, (bits, codes) in enumerate(t.planes):
        a = decode_plane_scales(unpack_codes(codes, cols // g), t.base_scale, j).double()
        planes.append((bits, 2 * a))
        offset = offset - a
    half_coefs = sum(coef for _, coef in planes) / 2
    out = ((offset + half_coefs) * x.double().reshape(tokens, 1, cols // g, g).sum(-1)).sum(-1)
    for i, (bits, coef) in enumerate(planes):
        columns = unpack_bits(bits, cols).long().reshape(rows, cols // 4, 4)
        patterns = (columns << torch.arange(4)).sum(-1)  # [rows, cols / 4]
        selected = tables[i < two_part_planes][:, torch.arange(cols // 4), patterns]  # [tokens, rows, cols / 4]
        out += (selected.reshape(tokens, rows, cols // g, g // 4).sum(-1) * coef).sum(-1)
    whole = rows // 16 * 16
    out[:, whole:] = x.double() @ dequantize(t)[whole:].double().T
    return out


# (spec, hidden, intermediate, segments as (expert, width, tokens)): several widths,
# group sizes that are odd multiples of 8 or not multiples of 8 at all, inputs that
# are not a multiple of 8, ragged and empty segments, one token and many tokens.
CASES = {
    "g32-all-widths": (
        MWQSpec(2, 8, 32),
        64,
        96,
        [(0, 2, 1), (0, 8, 3), (1, 3, 2), (1, 4, 4), (2, 5, 5), (2, 6, 17), (0, 7, 1)],
    ),
    "g24-ragged": (MWQSpec(1, 5, 24), 48, 72, [(2, 1, 3), (0, 5, 1), (1, 3, 0), (1, 4, 9)]),
    "g12-unaligned": (MWQSpec(3, 6, 12), 36, 24, [(0, 3, 1), (1, 6, 2), (2, 4, 6)]),
    "one-width": (MWQSpec(4, 4, 16), 32, 16, [(1, 4, 1), (0, 4, 2)]),
    "one-width-tiled": (MWQSpec(2, 2, 32), 64, 64, [(1, 2, 1), (0, 2, 5)]),  # no residual planes
    "many-tokens": (MWQSpec(2, 4, 64), 128, 64, [(1, 3, 70), (0, 4, 1)]),
    # 3 (AVX-512) or 6 (AVX2) vectors per group; 6 to 8 tokens fill the AVX-512 build's register block.
    "g48-token-blocks": (MWQSpec(2, 8, 48), 96, 48, [(0, 2, 8), (1, 5, 7), (2, 8, 6), (0, 4, 8), (1, 7, 3)]),
    # One token at every width in groups of whole 32-column words: the AVX-512 build's lookup-table path
    # (4 and 3 groups per row; 256 and 128 rows: whole 16-row blocks), and one group per row.
    "lookup-one-token": (
        MWQSpec(2, 8, 32),
        128,
        96,
        [(0, 2, 1), (1, 3, 1), (2, 4, 1), (0, 5, 1), (1, 6, 1), (2, 7, 1), (0, 8, 1), (1, 4, 2)],
    ),
    "lookup-one-group": (MWQSpec(2, 8, 64), 128, 64, [(0, 4, 1), (1, 8, 1)]),
    # A few tokens by lookup (AVX-512: tables per block of 8 tokens; planes in passes of at most 16 / tokens), one
    # block and more.
    "lookup-few-tokens": (
        MWQSpec(2, 8, 32),
        96,
        64,
        [(0, 2, 8), (1, 3, 5), (2, 4, 8), (0, 4, 3), (1, 5, 6), (2, 8, 4), (0, 6, 5), (1, 7, 3), (2, 2, 9), (0, 8, 5),
         (1, 3, 8), (2, 4, 4), (0, 4, 5)],
    ),
    # Around the register path's limit (AVX2: 8 tokens, AVX-512 without tiles, groups of 48: 24 in three blocks);
    # above it, rebuilt tiles and torch's GEMM.
    "register-token-limit": (MWQSpec(2, 8, 48), 96, 96, [(0, 4, 24), (1, 8, 25), (2, 3, 20), (0, 6, 9)]),
    # Around the lookup's limits (AVX-512 tiles: 256 tokens in blocks of 8, 64 at widths 7-8 with their two-part
    # tables); above them, tiles and torch's GEMM.
    "lookup-token-limit": (
        MWQSpec(2, 8, 32),
        64,
        96,
        [(0, 4, 256), (1, 3, 257), (2, 7, 64), (0, 8, 65), (1, 3, 20), (2, 6, 9)],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_grouped_mlp_matches_float64(backend, case):
    module, device = backend
    spec, hidden, inter, plan = CASES[case]
    gate_up, down = random_layer(spec, 3, hidden, inter, device)
    starts = [0]
    for _, _, tokens in plan:
        starts.append(starts[-1] + tokens)
    segments = ExpertSegments(tuple(e for e, _, _ in plan), tuple(b for _, b, _ in plan), tuple(starts))
    x = torch.randn(starts[-1], hidden, device=device)
    out = torch.full((starts[-1], hidden), float("nan"), device=device)
    module.grouped_mlp(x, resident(module, gate_up), resident(module, down), segments, out)
    for (e, bits, tokens), a, b in zip(plan, starts, starts[1:]):
        if tokens:
            want = float64_mlp(x[a:b], gate_up.expert(e, bits), down.expert(e, bits))
            assert_close(out[a:b], want, segment_tolerance(module, spec, hidden, inter, bits, tokens))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", range(2, 9))
def test_every_width_in_each_activation_dtype(backend, bits, dtype):
    """Width ``bits`` of a 2..8-bit checkpoint on inputs of ``dtype``, in shapes no tile size divides:
    hidden 100 (two K tiles, the second partial; two N tiles in the down projection), intermediate
    20, group 20 (packed rows of 13 and 3 bytes), segments of 1, 17 (two row blocks) and 5 tokens."""
    module, device = backend
    dtype = DTYPES[dtype]
    spec, hidden, inter = MWQSpec(2, 8, 20), 100, 20
    gate_up, down = random_layer(spec, 3, hidden, inter, device)
    plan = [(2, 1), (0, 17), (1, 5)]
    starts = [0]
    for _, tokens in plan:
        starts.append(starts[-1] + tokens)
    segments = ExpertSegments(tuple(e for e, _ in plan), (bits,) * len(plan), tuple(starts))
    x = torch.randn(starts[-1], hidden, device=device).to(dtype)
    out = torch.full((starts[-1], hidden), float("nan"), device=device)
    module.grouped_mlp(x, resident(module, gate_up), resident(module, down), segments, out)
    want = torch.cat(
        [
            float64_mlp(x[a:b], gate_up.expert(e, bits), down.expert(e, bits))
            for (e, _), a, b in zip(plan, starts, starts[1:])
        ]
    )
    assert_close(out, want, tolerance(module, dtype))


def float64_layer_forward(x, weights, ids, widths, gate_up, down) -> torch.Tensor:
    """``LayerExperts.forward`` in float64, pair by pair (experts of other ranks, -1, add nothing)."""
    want = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e, bits = int(ids[t, k]), int(widths[t, k])
            if e >= 0:
                expert = float64_mlp(x[t : t + 1], gate_up.expert(e, bits), down.expert(e, bits))[0]
                want[t] += float(weights[t, k]) * expert
    return want


# (spec, hidden, intermediate): groups of 16; groups of whole 32-column words, where one-token
# segments run by lookup (AVX-512 builds) with tables made once per segment of the call.
LAYER_SHAPES = {"g16": (MWQSpec(2, 6, 16), 48, 32), "g32-lookup": (MWQSpec(2, 8, 32), 64, 64)}


@pytest.mark.parametrize("shape", LAYER_SHAPES)
def test_layer_forward_mixes_experts_widths_and_ranks(backend, shape):
    """LayerExperts.forward: routing weights, experts of other ranks (-1), a different width per pair."""
    module, device = backend
    (spec, hidden, inter), tokens, top_k = LAYER_SHAPES[shape], 11, 3
    gate_up, down = random_layer(spec, 4, hidden, inter, device)
    layer = LayerExperts(gate_up, down, spec.max_bits, module)
    x = torch.randn(tokens, hidden, device=device)
    ids = torch.randint(-1, 4, (tokens, top_k), device=device)
    widths = torch.randint(spec.min_bits, spec.max_bits + 1, (tokens, top_k), device=device, dtype=torch.int8)
    weights = torch.rand(tokens, top_k, device=device)
    got = layer.forward(x, weights, ids, widths)
    want = float64_layer_forward(x, weights, ids, widths, gate_up, down)
    assert got.dtype == x.dtype
    assert_close(got, want, max(segment_tolerance(module, spec, hidden, inter, bits, 1) for bits in spec.widths))


@pytest.mark.parametrize(
    "spec,rows,cols", [(MWQSpec(2, 8, 32), 37, 96), (MWQSpec(1, 8, 64), 48, 192), (MWQSpec(3, 7, 128), 21, 256)]
)
def test_lookup_projection_is_the_float64_product_of_its_bfloat16_tables(backend, spec, rows, cols):
    """One projection (cpu_bitplanes.linear) at every width and token count its build runs by lookup, and the
    next one (other paths: exact), against lookup_product: the tables' rounding (one or two parts per plane) reproduced,
    only float32 accumulation left (1e-4). Rows past whole tiles (37, 21), 1 to 7 base planes, 2 to 4 groups per row, an
    outlier input channel, NaN-poisoned outputs."""
    module, _ = backend
    if module.NAME != "cpu-bitplanes":
        pytest.skip("the lookup path is cpu_bitplanes'")
    stacked = random_stacked(spec, 2, rows, cols, "cpu")
    prepared = module.prepare(stacked)
    for bits in spec.widths:
        limit, two_part_planes = module.lookup_plan(cols, spec.group_size, bits)
        for tokens in sorted({1, 2, 3, 5, 8, 9, 17, limit, limit + 1} - {0}):
            x = torch.randn(tokens, cols)
            x[:, 5] *= 20  # hidden states have outlier channels: large table entries
            out = torch.full((tokens, rows), float("nan"))
            module.linear(x, prepared, 1, bits, out)
            t = stacked.expert(1, bits)
            want = lookup_product(x, t, two_part_planes) if tokens <= limit else x.double() @ dequantize(t).double().T
            assert_close(out, want, 1e-4)


def test_layer_forward_splits_the_activation_across_threads_under_inference_mode(backend):
    """A layer call with more pairs x intermediate than torch's grain (the activation split by rows across two
    threads, cpu_bitplanes' Layer::activation) under torch.inference_mode, as vLLM serves: the worker threads write
    into an inference tensor (refused without the caller's thread-local state), and the result is the same bits
    as outside inference mode, within tolerance of float64."""
    module, device = backend
    if module.NAME != "cpu-bitplanes":
        pytest.skip("cpu_bitplanes' layer call")
    spec, hidden, inter, tokens, top_k = MWQSpec(2, 4, 32), 64, 1024, 40, 2  # 80 pairs: 80 x 1024 > 2 x 32768
    gate_up, down = random_layer(spec, 4, hidden, inter, device)
    layer = LayerExperts(gate_up, down, spec.max_bits, module)
    x = torch.randn(tokens, hidden)
    ids = torch.stack([torch.randperm(4)[:top_k] for _ in range(tokens)])
    widths = torch.randint(spec.min_bits, spec.max_bits + 1, (tokens, top_k), dtype=torch.int8)
    weights = torch.rand(tokens, top_k)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plain = layer.forward(x, weights, ids, widths)
        with torch.inference_mode():
            served = layer.forward(x, weights, ids, widths)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(served, plain)
    want = float64_layer_forward(x, weights, ids, widths, gate_up, down)
    assert_close(served, want, max(segment_tolerance(module, spec, hidden, inter, bits, 1) for bits in spec.widths))


def test_layer_forward_without_local_experts_is_zero(backend):
    module, device = backend
    spec = MWQSpec(2, 3, 16)
    layer = LayerExperts(*random_layer(spec, 2, 32, 16, device), spec.max_bits, module)
    ids = torch.full((3, 2), -1, device=device)
    out = layer.forward(
        torch.randn(3, 32, device=device),
        torch.rand(3, 2, device=device),
        ids,
        torch.full((3, 2), 3, device=device, dtype=torch.int8),
    )
    assert torch.equal(out.cpu(), torch.zeros(3, 32))


# (min bits, max bits, columns = the group size, rows); groups of 64 columns are tiled by the AVX-512 build,
# 21 rows into two tiles of 16, the second padded.
@pytest.mark.parametrize(
    "min_bits,max_bits,cols,rows",
    [(2, 8, 48, 5), (1, 4, 20, 5), (3, 7, 13, 5), (4, 4, 8, 5), (2, 5, 64, 21), (2, 2, 64, 21)],
)
def test_prepared_layout_holds_the_same_planes(backend, min_bits, max_bits, cols, rows):
    """A backend's resident layout gives back every width's planes and scales bit for bit."""
    module, device = backend
    if not hasattr(module, "prepare"):
        pytest.skip(f"{module.NAME} keeps the stacked tensors")
    stacked = random_stacked(MWQSpec(min_bits, max_bits, cols), 2, rows, cols, device)
    prepared = module.prepare(stacked)
    # About the packed bytes, plus the plane scale codes' table (64 bytes per plane) and tiles' padding rows
    # (per expert and row: its planes and, in one group, a float16 base scale and zero).
    padding = 2 * (max_bits * cols // 8 + 4) * (-rows % 16) if getattr(prepared, "tiled", False) else 0
    assert prepared.nbytes <= 1.01 * stacked.nbytes + 64 + 64 * (max_bits - min_bits) + padding
    for e in range(2):
        for bits in range(min_bits, max_bits + 1):
            want, got = stacked.expert(e, bits), prepared.expert(e, bits)
            assert got.shape == want.shape and got.bits == bits
            assert torch.equal(got.base_bits, want.base_bits)
            assert torch.equal(got.base_scale, want.base_scale) and torch.equal(got.base_zero, want.base_zero)
            for (gb, gs), (wb, ws) in zip(got.planes, want.planes, strict=True):
                assert torch.equal(gb, wb) and torch.equal(gs & 15, ws & 15)  # one group: the high half is padding


@pytest.mark.parametrize("rows,cols,group_size", [(2048, 256, 128), (37, 192, 64), (16, 32, 32), (5, 128, 32),
                                                  (50, 2048, 128), (21, 640, 32), (16, 1536, 64)])
def test_tiles_are_the_plane_words_regrouped(rows, cols, group_size):
    """``to_tiles`` (C++) against the layout it documents, written as a torch view: per group, per 16 rows
    (zero rows past the last), per 32-column word, the rows' words side by side; every byte of ``out``
    written (poisoned first)."""
    plane = torch.randint(0, 256, (rows, cols // 8), dtype=torch.uint8)
    out = torch.full((-(-rows // 16) * 16, cols // 8), 0xA5, dtype=torch.uint8)
    cpu_bitplanes.to_tiles(plane, group_size, out)
    padded = F.pad(plane, (0, 0, 0, -rows % 16))
    want = padded.view(-1, 16, cols // group_size, group_size // 32, 4).permute(2, 0, 3, 1, 4).reshape(-1, cols // 8)
    assert torch.equal(out, want)
    assert torch.equal(cpu_bitplanes.from_tiles(out, rows, group_size), plane)


def test_cpu_dispatch_uses_the_fused_kernel_and_logs_why(caplog, monkeypatch):
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="vllm_d2moe.kernels"):
        chosen = kernels.select_backend.__wrapped__("cpu")
    expected = (
        "cpu-bitplanes" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "torch-reference"
    )
    assert chosen.NAME == expected
    assert chosen.NAME in caplog.text


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="the CPU backend needs AVX2"
)
@pytest.mark.parametrize("forced", [None, "avx2"])
def test_cpu_build_follows_the_cpu_or_the_option_and_is_logged_once(forced):
    """A fresh process loads the CPU backend twice: one log line names the build and why."""
    script = (
        "import logging; logging.basicConfig(level=logging.INFO, format='%(message)s');"
        "from vllm_d2moe.kernels import cpu_bitplanes as c; c.load(); c.load()"
    )
    env = {k: v for k, v in os.environ.items() if k != cpu_bitplanes.ISA_ENV}
    if forced:
        env[cpu_bitplanes.ISA_ENV] = forced
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    isa, reason = (forced, "set by D2MOE_CPU_ISA") if forced else cpu_bitplanes.cpu_isa()
    chosen = [line for line in proc.stderr.splitlines() if "cpu_bitplanes runs its" in line]
    assert chosen == [f"d2moe: cpu_bitplanes runs its {isa} build ({reason})"]
    want = "avx2"
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        want = "avx512-bf16" if torch.cpu._is_avx512_bf16_supported() else "avx512"
    assert forced or isa == want


def test_unknown_cpu_build_option_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(cpu_bitplanes.ISA_ENV, "avx10")
    with pytest.raises(ValueError, match="D2MOE_CPU_ISA='avx10' is not one of avx2, avx512, avx512-bf16, avx512-simde"):
        cpu_bitplanes.load()


def test_failed_build_falls_back_to_the_reference_with_the_reason(caplog, monkeypatch):
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)

    def broken_load():
        raise RuntimeError("g++ not found")

    monkeypatch.setattr(importlib.import_module("vllm_d2moe.kernels.cpu_bitplanes"), "load", broken_load)
    with caplog.at_level(logging.INFO, logger="vllm_d2moe.kernels"):
        chosen = kernels.select_backend.__wrapped__("cpu")
    assert chosen.NAME == "torch-reference"
    assert "g++ not found" in caplog.text


@pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="the Triton tests run in this process already",
)
def test_triton_backend_interpreted():
    """The Triton backend's tests, under the interpreter, in a process where triton is fresh."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton_mwq"],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,  # the assertion below shows the output
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


# --- cpu_int8: int8 activations, integer dot products (kernels/cpu_int8.py) ---------------------------
#
# Not one of BACKENDS: its result is the product of the weights with int8-rounded activations, so
# it is held to two references. (1) One projection against the float64 product of the same int8
# activations (reproduced by int8_activations below): only float32 accumulation differs, tolerance
# 1e-5 of the output scale. (2) The whole MLP against the float64 MLP of the float inputs: each
# input is off by at most half a step (max|x| / 254 of its group): 0.5-0.6% RMS for normal inputs
# (groups of 32-128), more for the heavy-tailed SiLU products that enter the down projection. In
# a torch simulation of these shapes (int8_activations at both stages, 40 tokens) the MLP's error
# was 1.1-1.6% RMS of the output and at most 1.5% of its largest magnitude: tolerance 3e-2 of
# the output scale (and rtol 3e-2).

needs_avx2 = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="the int8 backend needs AVX2"
)
INT8_ROUNDING_TOLERANCE = 3e-2


@pytest.fixture(params=["own", "avx2"])
def int8_build(request, monkeypatch):
    """The int8 backend's build for this CPU (``own``) and, forced through ``D2MOE_CPU_ISA``, its AVX2 build;
    the AVX-512 build takes group sizes that are multiples of 64 (the others run the AVX2 build)."""
    if request.param == "avx2":
        if cpu_bitplanes.cpu_isa()[0] == "avx2":
            pytest.skip("the own case runs this CPU's avx2 build")
        monkeypatch.setenv(cpu_bitplanes.ISA_ENV, "avx2")
    else:
        monkeypatch.delenv(cpu_bitplanes.ISA_ENV, raising=False)
    return request.param


def int8_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """The int8 backend's inputs, float64: per row and group ``t = max|x| / 127`` and ``c = round(x * (127 /
    max|x|))`` in float32, ties to even, as the kernel rounds; returns ``c * t``."""
    g = x.float().reshape(x.shape[0], -1, group)
    amax = g.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127).div(amax), torch.zeros_like(amax))
    codes = torch.round(g * inverse)
    return (codes.double() * amax.div(torch.full_like(amax, 127)).double()).reshape(x.shape)


@pytest.mark.extended  # the opt-in integer backend: its C++ build takes minutes
@needs_avx2
@pytest.mark.parametrize(
    "spec,rows,cols",
    [
        (MWQSpec(2, 8, 32), 37, 96),
        (MWQSpec(1, 8, 64), 5, 192),
        (MWQSpec(5, 8, 128), 67, 256),
        (MWQSpec(7, 8, 32), 3, 64),
    ],
)
@pytest.mark.parametrize("tokens", [1, 6, 21])
def test_int8_linear_is_the_float64_product_of_its_int8_activations(int8_build, spec, rows, cols, tokens):
    """Every width of one projection; odd row counts, an odd number of groups, 1 to 7 base planes, one token
    and more than a register block (4) and a decode batch (16); outputs pre-filled with NaN."""
    stacked = cpu_int8.prepare(random_stacked(spec, 2, rows, cols, "cpu"))
    x = torch.randn(tokens, cols)
    x[:, 5] *= 20  # an outlier channel, as hidden states have: its group's step grows
    for bits in spec.widths:
        out = torch.full((tokens, rows), float("nan"))
        cpu_int8.linear(x, stacked, 1, bits, out)
        want = int8_activations(x, spec.group_size) @ dequantize(stacked.expert(1, bits)).double().T
        assert_close(out, want, 1e-5)


@pytest.mark.extended  # the opt-in integer backend: its C++ build takes minutes
@needs_avx2
@pytest.mark.parametrize(
    "spec,hidden,inter",
    [(MWQSpec(2, 8, 32), 96, 64), (MWQSpec(2, 8, 128), 256, 128)],
)
def test_int8_grouped_mlp_is_the_float_mlp_within_int8_rounding(int8_build, spec, hidden, inter):
    """Every width 2..8 in one call: ragged and empty segments, 1 to 17 tokens, row blocks cut short."""
    gate_up, down = (cpu_int8.prepare(p) for p in random_layer(spec, 3, hidden, inter, "cpu"))
    plan = [(0, 2, 1), (1, 8, 3), (2, 4, 17), (0, 5, 0), (1, 3, 4), (2, 6, 1), (0, 7, 9)]
    starts = [0]
    for _, _, tokens in plan:
        starts.append(starts[-1] + tokens)
    segments = ExpertSegments(tuple(e for e, _, _ in plan), tuple(b for _, b, _ in plan), tuple(starts))
    x = torch.randn(starts[-1], hidden, dtype=torch.bfloat16)
    out = torch.full((starts[-1], hidden), float("nan"))
    cpu_int8.grouped_mlp(x, gate_up, down, segments, out)
    want = torch.cat(
        [
            float64_mlp(x[a:b], gate_up.expert(e, bits), down.expert(e, bits))
            for (e, bits, _), a, b in zip(plan, starts, starts[1:])
        ]
    )
    assert_close(out, want, INT8_ROUNDING_TOLERANCE)


@pytest.mark.extended  # the opt-in integer backend: its C++ build takes minutes
@needs_avx2
def test_int8_backend_chosen_by_option_serves_layer_experts(monkeypatch):
    """D2MOE_KERNEL=cpu_int8 selects it; LayerExperts.forward with it: routing weights, other ranks' experts
    (-1), a width per pair."""
    monkeypatch.setenv(kernels.BACKEND_ENV, "cpu_int8")
    module = kernels.select_backend.__wrapped__("cpu")
    assert module.NAME == "cpu-int8"
    spec, tokens, top_k = MWQSpec(2, 6, 32), 11, 3
    gate_up, down = random_layer(spec, 4, 64, 32, "cpu")
    layer = LayerExperts(gate_up, down, spec.max_bits, module)
    x = torch.randn(tokens, 64)
    ids = torch.randint(-1, 4, (tokens, top_k))
    widths = torch.randint(spec.min_bits, spec.max_bits + 1, (tokens, top_k), dtype=torch.int8)
    weights = torch.rand(tokens, top_k)
    got = layer.forward(x, weights, ids, widths)
    want = float64_layer_forward(x, weights, ids, widths, gate_up, down)
    assert_close(got, want, INT8_ROUNDING_TOLERANCE)


@pytest.mark.extended  # the opt-in integer backend: its C++ build takes minutes
@needs_avx2
def test_int8_backend_refuses_group_sizes_it_cannot_run_by_name():
    with pytest.raises(MWQError, match="D2MOE_KERNEL=cpu_int8: group size 16 is not a multiple of 32"):
        cpu_int8.prepare(random_stacked(MWQSpec(2, 4, 16), 1, 4, 32, "cpu"))


def test_int8_build_follows_the_cpu_build_and_the_group_size(monkeypatch):
    monkeypatch.setenv(cpu_bitplanes.ISA_ENV, "avx2")
    assert cpu_int8.build_for(128) == ("avx2", "cpu_bitplanes runs avx2 here (set by D2MOE_CPU_ISA)")
    for isa in ("avx512", "avx512-bf16"):
        monkeypatch.setenv(cpu_bitplanes.ISA_ENV, isa)
        assert cpu_int8.build_for(128) == ("avx512", "set by D2MOE_CPU_ISA")
        assert cpu_int8.build_for(96) == ("avx2", "group size 96 is not a multiple of 64")
