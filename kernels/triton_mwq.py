"""Triton MWQ expert kernels for GPUs: fused dequantize-and-multiply over all
(expert, width) segments of a layer call in one launch per projection.

In the spirit of vLLM's fused-MoE Triton kernel: the pairs, already sorted by
segment, are cut into blocks of ``BLOCK_M`` rows that never straddle two
segments (a segment's last block is masked, not padded with other tokens), and
a block table tells each program its expert, width and rows. Each program
rebuilds a ``[BLOCK_K, BLOCK_N]`` tile of the expert's weights from the base
bit planes and the segment's first ``width - min_bits`` residual planes
straight from the packed layout (formula in ``vllm_d2moe/mwq/quantize.py``; a
residual plane's scale is its 4-bit code's table entry times the base scale,
``vllm_d2moe/mwq/plane_scales.py``) in float32, then multiplies on the tensor
cores: the tile and the inputs are cast to the activations' dtype when that is bfloat16 or float16, and float32
activations use TF32 (``tl.dot``'s default precision); accumulation is float32
throughout. Every tile is at least 16 wide in M, N and K, as ``tl.dot`` needs,
whatever the matrix sizes (edges are masked), so every width and shape takes
the tensor-core path. The gate/up launch applies SiLU-and-multiply before
storing, so only ``[pairs, intermediate]`` float32 activations go between the
launches (rounded to the dot dtype when the down launch reads them).

Error against the exact (float64) product: the rounding of weights, inputs and
activations to the dot dtype, about 2^-11 of each term in float16 and TF32 and
2^-8 in bfloat16, far below the step of the 8-bit width (2^-8 of the group's
range); ``tests/test_kernels.py`` states the tolerances it checks.

The block table is built on the host from the segment plan (the op that calls
this runs outside CUDA graphs and decides on the host anyway:
``vllm_d2moe/vllm_glue/expert_op.py``) and copied once per call.

Checked on CPUs with ``TRITON_INTERPRET=1`` (``tests/test_kernels.py``; the
interpreter cannot multiply bfloat16, so there :func:`_dot` rounds the operands
and multiplies them exactly in float32) and by the same tests on CUDA, run by
``scripts/gpu_check.sh``.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from vllm_d2moe.mwq.plane_scales import decode_table

NAME = "triton-mwq"

BLOCK_M = 16  # smallest tl.dot tile: decode segments are one or a few tokens
BLOCK_N = 64
BLOCK_K = 64


@triton.jit
def _weight_tile(
    base_bits,
    base_scale,
    base_zero,
    plane_bits,
    plane_scale,
    scale_table,
    expert,
    residual_planes,
    offs_k,
    offs_n,
    mask,
    ROWS,
    ROW_BYTES,
    GROUPS,
    GROUP_SIZE,
    RESIDENT_PLANES,
    MIN_BITS: tl.constexpr,
):
    """``W[offs_n, offs_k]`` of ``expert`` with ``residual_planes`` residual planes, as a float32 ``[K, N]`` tile."""
    rows = offs_n[None, :].to(tl.int64)
    byte = (offs_k // 8)[:, None]
    shift = (offs_k % 8)[:, None].to(tl.uint8)
    group = (offs_k // GROUP_SIZE)[:, None]
    in_matrix = rows * GROUPS + group  # scale of (row, group)
    code_row_bytes = (GROUPS + 1) // 2
    code_in_matrix = rows * code_row_bytes + group // 2  # the byte of (row, group)'s scale code
    code_shift = ((group % 2) * 4).to(tl.uint8)
    scale_at = expert * ROWS * GROUPS + in_matrix
    s = tl.load(base_scale + scale_at, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(base_zero + scale_at, mask=mask, other=0.0).to(tl.float32)
    q = tl.zeros(mask.shape, dtype=tl.float32)
    for i in tl.static_range(MIN_BITS):
        packed = tl.load(
            base_bits + ((expert * MIN_BITS + i) * ROWS + rows) * ROW_BYTES + byte, mask=mask, other=0
        )
        q += ((packed >> shift) & 1).to(tl.float32) * (1 << i)
    w = (q - z) * s
    for j in range(residual_planes):
        plane = expert * RESIDENT_PLANES + j
        packed = tl.load(plane_bits + (plane * ROWS + rows) * ROW_BYTES + byte, mask=mask, other=0)
        code_byte = tl.load(plane_scale + plane * ROWS * code_row_bytes + code_in_matrix, mask=mask, other=0)
        code = ((code_byte >> code_shift) & 15).to(tl.int32)
        a = s * tl.load(scale_table + j * 16 + code, mask=mask, other=0.0)
        w += tl.where(((packed >> shift) & 1) != 0, a, -a)
    return w


@triton.jit
def _dot(a, b, acc, DOT_DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    """``acc + a @ b`` with ``a``, ``b`` rounded to ``DOT_DTYPE`` and float32 accumulation.

    The interpreter keeps bfloat16 as raw 16-bit integers and its dot multiplies
    those, so there the operands are rounded to ``DOT_DTYPE`` and multiplied
    exactly in float32: what a 16-bit tensor-core dot with float32 accumulation
    computes (a product of two 16-bit floats is exact in float32).
    """
    if INTERPRETED:
        a = a.to(DOT_DTYPE).to(tl.float32)
        b = b.to(DOT_DTYPE).to(tl.float32)
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)


@triton.jit
def _mwq_matmul_kernel(
    x,
    out,
    blocks,
    base_bits,
    base_scale,
    base_zero,
    plane_bits,
    plane_scale,
    scale_table,
    K,
    N,
    ROWS,
    ROW_BYTES,
    GROUPS,
    GROUP_SIZE,
    RESIDENT_PLANES,
    MIN_BITS: tl.constexpr,
    GATED: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[m, n] = x[m] . W[n]`` for one block of rows; with ``GATED``, W is
    gate over up (``ROWS = 2N``) and ``out = silu(x . W_gate[n]) * (x . W_up[n])``."""
    block = tl.program_id(0)
    expert = tl.load(blocks + block * 4).to(tl.int64)
    residual_planes = tl.load(blocks + block * 4 + 1)
    first = tl.load(blocks + block * 4 + 2)
    end = tl.load(blocks + block * 4 + 3)
    offs_m = first + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < end
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xs = tl.load(
            x + offs_m[:, None].to(tl.int64) * K + offs_k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        mask = mask_k[:, None] & mask_n[None, :]
        w = _weight_tile(
            base_bits,
            base_scale,
            base_zero,
            plane_bits,
            plane_scale,
            scale_table,
            expert,
            residual_planes,
            offs_k,
            offs_n,
            mask,
            ROWS,
            ROW_BYTES,
            GROUPS,
            GROUP_SIZE,
            RESIDENT_PLANES,
            MIN_BITS,
        )
        acc = _dot(xs, w, acc, DOT_DTYPE, INTERPRETED)
        if GATED:
            w_up = _weight_tile(
                base_bits,
                base_scale,
                base_zero,
                plane_bits,
                plane_scale,
                scale_table,
                expert,
                residual_planes,
                offs_k,
                offs_n + N,
                mask,
                ROWS,
                ROW_BYTES,
                GROUPS,
                GROUP_SIZE,
                RESIDENT_PLANES,
                MIN_BITS,
            )
            acc_up = _dot(xs, w_up, acc_up, DOT_DTYPE, INTERPRETED)
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    tl.store(
        out + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :]
    )


# The dot input dtype for each activation dtype: 16-bit activations stay 16-bit, float32 ones use
# TF32 (tl.dot's default for float32 operands on tensor cores).
_DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def dot_dtype(dtype: torch.dtype):
    """The ``tl.dot`` input dtype for activations of ``dtype``."""
    try:
        return _DOT_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"triton-mwq: activations of dtype {dtype} are not supported (bf16, fp16, fp32)") from None


def _block_table(segments, min_bits: int, device) -> torch.Tensor:
    """int32 ``[blocks, 4]``: (expert, residual planes, first row, end row) per block of ``BLOCK_M`` rows."""
    rows = []
    for expert, bits, start, end in zip(
        segments.experts, segments.bits, segments.starts, segments.starts[1:]
    ):
        rows += [(expert, bits - min_bits, m, min(m + BLOCK_M, end)) for m in range(start, end, BLOCK_M)]
    return torch.tensor(rows, dtype=torch.int32).to(device)


@functools.cache
def _scale_table(planes: int, device: torch.device) -> torch.Tensor:
    """The plane scale codes' decoding table on ``device`` (at least one plane's: a real pointer)."""
    return decode_table(max(planes, 1)).to(device)


def _matmul(x, projection, blocks, out, gated: bool, dtype) -> None:
    rows, cols = projection.shape
    n = rows // 2 if gated else rows
    grid = (blocks.shape[0], triton.cdiv(n, BLOCK_N))
    plane_bits, plane_scale = projection.plane_bits, projection.plane_scale
    if plane_bits.numel() == 0:  # no residual planes: never read, but the launcher wants a real uint8 pointer
        plane_bits, plane_scale = projection.base_bits, projection.base_bits
    _mwq_matmul_kernel[grid](
        x,
        out,
        blocks,
        projection.base_bits,
        projection.base_scale,
        projection.base_zero,
        plane_bits,
        plane_scale,
        _scale_table(projection.plane_bits.shape[1], x.device),
        cols,
        n,
        rows,
        projection.base_bits.shape[-1],
        projection.base_scale.shape[-1],
        projection.group_size,
        projection.plane_bits.shape[1],
        MIN_BITS=projection.min_bits,
        GATED=gated,
        DOT_DTYPE=dtype,
        INTERPRETED=os.environ.get("TRITON_INTERPRET") == "1",
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )


def grouped_mlp(x, gate_up, down, segments, out) -> None:
    """See ``kernels/__init__.py``: two launches (gate/up with SiLU-and-multiply, then down) for all segments."""
    if segments.starts[-1] == 0:
        return
    dtype = dot_dtype(x.dtype)
    blocks = _block_table(segments, gate_up.min_bits, x.device)
    act = torch.empty(x.shape[0], down.shape[1], dtype=torch.float32, device=x.device)
    _matmul(x.contiguous(), gate_up, blocks, act, gated=True, dtype=dtype)
    _matmul(act, down, blocks, out, gated=False, dtype=dtype)
