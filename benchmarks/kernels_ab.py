"""One kernel source against another in one process: the current ``cpu_bitplanes`` against
``kernels/cpu_bitplanes.cpp`` at an earlier commit built for the same instruction set, on one OLMoE expert MLP
per call, or with ``--layer`` one OLMoE layer call (``moe_forward``: the tokens routed top-8 among 64 experts, a
fresh random routing per call, every pair at the width). The earlier build reads planes as stored (row-major,
one chunk per plane: its layout up to 222671b..e994baa), or with ``--same-layout`` this build's resident planes
(tiles, from b311ba1 on), with the scales in the tiles' order where the old source reads them so (from 78ae0cf
on), else row-major.

Both builds are loaded side by side (the old one under its own op namespace), calls alternate between them
on different experts of a pool larger than the last-level cache, and the median ms per call is printed for
every token count and width, with the speed-up. Before timing, one call of each on the same input must agree
(printed: the largest difference). Machine-noise between runs does not enter the ratios.

    python benchmarks/kernels_ab.py --rev e994baa --tokens 1 2 3 4 6 8 16 --widths 2 3 4 8 --reps 40
    python benchmarks/kernels_ab.py --rev f9740bc --same-layout --tokens 1 2 4 8 --widths 2 4 8
    python benchmarks/kernels_ab.py --rev HEAD --same-layout --layer --tokens 1 8 16 --widths 2 4 8
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.utils.cpp_extension

sys.path.insert(0, str(Path(__file__).parent))
from kernels import (  # noqa: E402
    cpu_bitplanes,  # noqa: E402
    load_backend,
    mwq_bytes,
    pool_size,
    random_stacked,
)

REPO = Path(__file__).resolve().parents[1]
HIDDEN, INTER = 2048, 1024  # OLMoE-1B-7B's expert
EXPERTS, TOP_K = 64, 8  # and its layer's routing


def load_old(rev: str):
    """``rev``'s kernel source built with this build's flags (``avx512-bf16`` or ``avx512``), as
    ``torch.ops.d2moe_cpu_old``, and whether it reads tiled scales in the tiles' order (from 78ae0cf on)."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:kernels/cpu_bitplanes.cpp"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_cpu_bitplanes.cpp"
    path.write_text(source)
    flags = cpu_bitplanes.ISAS[cpu_bitplanes.choose_isa()[0]]
    torch.utils.cpp_extension.load(name="d2moe_cpu_bitplanes_old", sources=[str(path)],
                                   extra_cflags=[*flags, "-DD2MOE_LIBRARY=d2moe_cpu_old"],
                                   extra_ldflags=["-fopenmp"], is_python_module=True)
    return torch.ops.d2moe_cpu_old, "kTileCodeBytes" in source


def rows_as_stored(stacked, scale_table):
    """``stacked``'s planes one chunk each, row-major, with the kernel's 4 bytes of slack; its scales."""
    planes = [stacked.base_bits[:, i] for i in range(stacked.min_bits)]
    planes += [stacked.plane_bits[:, j] for j in range(stacked.plane_bits.shape[1])]
    chunks = []
    for plane in planes:
        chunk = torch.empty(plane.numel() + 4, dtype=torch.uint8)[: plane.numel()].view(plane.shape)
        chunks.append(chunk.copy_(plane))
    return chunks, [stacked.base_scale, stacked.base_zero, stacked.plane_scale, scale_table]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="e994baa", help="commit of the old kernel source")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 16])
    parser.add_argument("--widths", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--pool-mb", type=float, default=64.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--same-layout", action="store_true", help="the old build reads this build's resident planes")
    parser.add_argument("--layer", action="store_true",
                        help=f"each call one layer call of the tokens, top-{TOP_K} among {EXPERTS} experts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_bitplanes.choose_isa()[0].startswith("avx512"):
        sys.exit("kernels_ab.py compares AVX-512 builds; this CPU runs " + cpu_bitplanes.choose_isa()[0])
    old_ops, old_tiled_scales = load_old(args.rev)
    # Each pool expert holds every plane (widths up to 8); a layer call routes among the layer's experts.
    n = EXPERTS if args.layer else pool_size(
        mwq_bytes(random_stacked(2 * INTER, HIDDEN, 1), 8) + mwq_bytes(random_stacked(HIDDEN, INTER, 1), 8),
        args.pool_mb)
    gate_up, down = random_stacked(2 * INTER, HIDDEN, n), random_stacked(HIDDEN, INTER, n)
    fused = load_backend("cpu_bitplanes")
    new = (fused.prepare(gate_up), fused.prepare(down))
    new_args = tuple(fused.projection_args(p) for p in new)
    if args.same_layout and old_tiled_scales:
        old = new_args
    elif args.same_layout:  # this build's planes, the scales row-major as the old build reads them
        old = tuple(([*p.chunks], [s.base_scale, s.base_zero, s.plane_scale, p.scale_table])
                    for p, s in zip(new, (gate_up, down), strict=True))
    else:
        old = (rows_as_stored(gate_up, new[0].scale_table), rows_as_stored(down, new[1].scale_table))

    # Both builds called alike, straight to their ops: a Python wrapper on one side only cost it about 0.02 ms a
    # call, 5-15 % of a one-token call (an A/A run of one source against itself read 0.84-1.01x).
    # A call's `key`: the expert (one expert MLP) or the routing (a layer call).
    def call(ops, projections):
        tensors = (*projections[0], *projections[1], gate_up.min_bits, gate_up.group_size)

        def run(x, key, width, out):
            if args.layer:
                ids, weights, widths = key
                out.copy_(ops.moe_forward(x, weights, ids, widths, *tensors))
                return
            table = torch.tensor([[key, width, 0, x.shape[0]]], dtype=torch.int64)
            ops.moe_segments(x, table, *tensors, out)
        return run

    def key(call_index: int, tokens: int, width: int):
        if not args.layer:
            return call_index % n
        routing = torch.Generator().manual_seed(call_index)
        ids = torch.stack([torch.randperm(EXPERTS, generator=routing)[:TOP_K] for _ in range(tokens)])
        return ids, torch.rand(tokens, TOP_K, generator=routing), torch.full_like(ids, width, dtype=torch.int8)

    run_old = call(old_ops, old)
    run_new = call(fused.ops(), new_args)

    x = torch.randn(3, HIDDEN)
    want, got = torch.empty(3, HIDDEN), torch.empty(3, HIDDEN)
    run_old(x, key(1, 3, 4), 4, want)
    run_new(x, key(1, 3, 4), 4, got)
    print(f"{n} experts per pool; old against new, 3 tokens, width 4: largest difference "
          f"{(want - got).abs().max().item():.2e} of {want.abs().max().item():.2e}")
    for tokens in args.tokens:
        x, out = torch.randn(tokens, HIDDEN), torch.empty(tokens, HIDDEN)
        cells = []
        for width in args.widths:
            times = {run_old: [], run_new: []}
            for rep in range(args.reps):
                for k, run in enumerate(times):
                    call_key = key(2 * rep + k, tokens, width)
                    start = time.perf_counter()
                    run(x, call_key, width, out)
                    times[run].append(time.perf_counter() - start)
            before, after = (statistics.median(times[run]) * 1e3 for run in (run_old, run_new))
            cells.append(f"w{width} {before:.3f} -> {after:.3f} ({before / after:.2f}x)")
        print(f"{tokens:2d} tokens: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
