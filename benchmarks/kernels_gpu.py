"""The Triton MWQ kernel on a CUDA device against bf16 ``torch.matmul`` on the same shapes.

One realistic expert shape (hidden 2048, intermediate 1408, group 128, widths 2..8, as
``benchmarks/kernels.py`` uses on CPUs): the whole SwiGLU MLP (gate/up, SiLU-and-multiply,
down) of one segment per call, for 1 / 8 / 64 tokens, timed with CUDA events for

* ``triton_mwq.grouped_mlp`` at widths 2, 4, 6 and 8, bf16 activations (tensor-core dots);
* the same MLP as bf16 ``F.linear`` on dequantized weights (what an unquantized model runs).

Every call uses the next expert of a pool of at least ``--pool-mb`` per method, larger than
the GPU's L2 cache, so weights come from HBM as in decoding a real model. Reports the median
and minimum per call, and the weight bytes each call reads. Writes ``--out/NAME.json``.

    python benchmarks/kernels_gpu.py [--tokens 1 8 64] [--reps 50] [--pool-mb 512] [--out DIR]
"""

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_d2moe.experts import ExpertSegments
from vllm_d2moe.kernels import load_backend

from kernels import GROUP, HIDDEN, INTER, random_stacked  # benchmarks/kernels.py: the same expert shape

WIDTHS = (2, 4, 6, 8)


def time_calls(calls, reps: int) -> tuple[float, float]:
    """(median, min) microseconds of ``calls[i % len(calls)]()``, after a warm-up round."""
    for call in calls:
        call()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        calls[i % len(calls)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--pool-mb", type=float, default=512.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="kernels-gpu")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernels_gpu.py needs a CUDA device")
    backend = load_backend("triton_mwq")
    full = random_stacked(2 * INTER, HIDDEN, 1, "cuda"), random_stacked(HIDDEN, INTER, 1, "cuda")
    expert_bytes = sum(p.nbytes for p in full)
    experts = max(2, int(args.pool_mb * 2**20 / expert_bytes) + 1)
    gate_up, down = random_stacked(2 * INTER, HIDDEN, experts, "cuda"), random_stacked(HIDDEN, INTER, experts, "cuda")
    bf16_bytes = 3 * HIDDEN * INTER * 2
    bf16_experts = max(2, int(args.pool_mb * 2**20 / bf16_bytes) + 1)
    w13 = torch.randn(bf16_experts, 2 * INTER, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(bf16_experts, HIDDEN, INTER, device="cuda", dtype=torch.bfloat16) * 0.02

    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(tokens, HIDDEN, device="cuda")

        def bf16_mlp(e, x=x):
            gate, up = F.linear(x, w13[e]).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, w2[e])

        median, best = time_calls([lambda e=e: bf16_mlp(e) for e in range(bf16_experts)], args.reps)
        rows.append({"method": "bf16 F.linear", "tokens": tokens, "bits": 16, "median_us": median,
                     "min_us": best, "weight_bytes": bf16_bytes})
        for bits in WIDTHS:
            def mwq(e, bits=bits, tokens=tokens, x=x, out=out):
                segments = ExpertSegments((e,), (bits,), (0, tokens))
                backend.grouped_mlp(x, gate_up, down, segments, out)

            median, best = time_calls([lambda e=e: mwq(e) for e in range(experts)], args.reps)
            width_bytes = sum(p.expert(0, bits).nbytes for p in (gate_up, down))
            rows.append({"method": "triton-mwq", "tokens": tokens, "bits": bits, "median_us": median,
                         "min_us": best, "weight_bytes": width_bytes})
    print(f"{torch.cuda.get_device_name()}: expert MLP {HIDDEN}x{INTER}, group {GROUP}")
    print(f"{'method':<14} {'tokens':>6} {'bits':>4} {'median us':>10} {'min us':>8} {'GB/s':>7}")
    for r in rows:
        gbps = r["weight_bytes"] / (r["median_us"] * 1e-6) / 1e9
        print(f"{r['method']:<14} {r['tokens']:>6} {r['bits']:>4} {r['median_us']:>10.1f} {r['min_us']:>8.1f} "
              f"{gbps:>7.0f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "hidden": HIDDEN, "intermediate": INTER,
                                "group": GROUP, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
