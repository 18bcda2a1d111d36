"""Triton MWQ expert kernels for GPUs: fused dequantize-and-multiply over all
(expert, width) segments of a layer call in one launch per projection.

In the spirit of vLLM's fused-MoE Triton kernel: the pairs, already sorted by
segment, are cut into blocks of ``BLOCK_M`` rows that never straddle two
segments (a segment's last block is masked, not padded with other tokens), and
a host-built block table tells each program its expert, width and rows. Each
program rebuilds a ``[BLOCK_K, BLOCK_N]`` tile of the expert's weights from the
base bit planes and the segment's first ``width - min_bits`` residual planes
straight from the packed layout (formula in ``vllm_d2moe/mwq/quantize.py``) and
multiplies it in float32 (``input_precision="ieee"``: TF32 would miss the
reference tolerance). The gate/up launch applies SiLU-and-multiply before
storing, so only ``[pairs, intermediate]`` activations go between the launches.

Checked on CPUs with ``TRITON_INTERPRET=1`` (``tests/test_kernels.py``); not yet
timed on a GPU.
"""

import torch
import triton
import triton.language as tl

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
    in_matrix = rows * GROUPS + (offs_k // GROUP_SIZE)[:, None]  # scale of (row, group)
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
        a = tl.load(plane_scale + plane * ROWS * GROUPS + in_matrix, mask=mask, other=0.0).to(tl.float32)
        w += tl.where(((packed >> shift) & 1) != 0, a, -a)
    return w


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
    K,
    N,
    ROWS,
    ROW_BYTES,
    GROUPS,
    GROUP_SIZE,
    RESIDENT_PLANES,
    MIN_BITS: tl.constexpr,
    GATED: tl.constexpr,
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
        ).to(tl.float32)
        mask = mask_k[:, None] & mask_n[None, :]
        w = _weight_tile(
            base_bits,
            base_scale,
            base_zero,
            plane_bits,
            plane_scale,
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
        acc = tl.dot(xs, w, acc, input_precision="ieee")
        if GATED:
            w_up = _weight_tile(
                base_bits,
                base_scale,
                base_zero,
                plane_bits,
                plane_scale,
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
            acc_up = tl.dot(xs, w_up, acc_up, input_precision="ieee")
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    tl.store(
        out + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :]
    )


def _block_table(segments, min_bits: int, device) -> torch.Tensor:
    """int32 ``[blocks, 4]``: (expert, residual planes, first row, end row) per block of ``BLOCK_M`` rows."""
    rows = []
    for expert, bits, start, end in zip(
        segments.experts, segments.bits, segments.starts, segments.starts[1:]
    ):
        rows += [(expert, bits - min_bits, m, min(m + BLOCK_M, end)) for m in range(start, end, BLOCK_M)]
    return torch.tensor(rows, dtype=torch.int32).to(device)


def _matmul(x, projection, blocks, out, gated: bool) -> None:
    rows, cols = projection.shape
    n = rows // 2 if gated else rows
    grid = (blocks.shape[0], triton.cdiv(n, BLOCK_N))
    plane_bits, plane_scale = projection.plane_bits, projection.plane_scale
    if plane_bits.numel() == 0:  # no residual planes: never read, but the launcher wants a real pointer
        plane_bits, plane_scale = projection.base_bits, projection.base_scale
    _mwq_matmul_kernel[grid](
        x,
        out,
        blocks,
        projection.base_bits,
        projection.base_scale,
        projection.base_zero,
        plane_bits,
        plane_scale,
        cols,
        n,
        rows,
        projection.base_bits.shape[-1],
        projection.base_scale.shape[-1],
        projection.group_size,
        projection.plane_bits.shape[1],
        MIN_BITS=projection.min_bits,
        GATED=gated,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )


def grouped_mlp(x, gate_up, down, segments, out) -> None:
    """See ``kernels/__init__.py``: two launches (gate/up with SiLU-and-multiply, then down) for all segments."""
    if segments.starts[-1] == 0:
        return
    blocks = _block_table(segments, gate_up.min_bits, x.device)
    act = torch.empty(x.shape[0], down.shape[1], dtype=torch.float32, device=x.device)
    _matmul(x.contiguous(), gate_up, blocks, act, gated=True)
    _matmul(act, down, blocks, out, gated=False)
