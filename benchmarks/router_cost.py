"""What the bit-width decision costs next to the MoE layer it steers.

For one MoE layer call of each shape and token count: the time of the width
decision as serving makes it (:class:`vllm_d2moe.width_selection.WidthSelector`:
router product, log-softmax, capacity assignment, statistics), once as the C++
call it is on CPU (``kernels/cpu_width_select``) and once as the torch ops it
replaces (what a CPU without that extension runs), and the time of the expert
compute it feeds (:meth:`vllm_d2moe.experts.LayerExperts.forward` with the CPU
kernel, widths 2/3/4 from the router), per router kind and with or without
capacities. The issue's bar: the decision under 2 % of the layer.

Timed on one thread in per-thread CPU time (``time.thread_time``), so that
other jobs on a shared machine do not count. Each decision is timed right
after a layer call, as serving makes it (its router weights no longer in the
caches), less the clock's own cost (about a microsecond, measured); the
"warm" time is ``--inner`` C++ decisions back to back, the floor. Medians
over ``--reps`` samples, every part timed in every sample.

    python benchmarks/router_cost.py        # table, results/router_cost.{json,png}
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

from vllm_d2moe import width_selection
from vllm_d2moe.experts import LayerExperts
from vllm_d2moe.kernels import select_backend
from vllm_d2moe.router.model import WidthRouter
from vllm_d2moe.router.policy import ServingWidths
from vllm_d2moe.width_selection import WidthSelector

from kernels import random_stacked  # benchmarks/kernels.py: random packed experts

RESULTS = Path(__file__).parent / "results"
WIDTHS = (2, 3, 4)
CAPACITIES = (0.3, 0.4, 0.3)
# (name, hidden, intermediate, experts, top_k)
SHAPES = [
    ("reference-small", 256, 512, 8, 2),
    ("mixtral-like", 2048, 1408, 8, 2),
    ("olmoe-like", 2048, 1024, 64, 8),
]
WARMUP = 3


def cpu_ms(call, repeat: int = 1) -> float:
    """Per-thread CPU milliseconds per call, over ``repeat`` calls in a row."""
    start = time.thread_time()
    for _ in range(repeat):
        call()
    return (time.thread_time() - start) * 1e3 / repeat


def layer_call(layer, shape, tokens: int, kind: str, capacities, reps: int, inner: int, clock: float) -> dict:
    name, hidden, _, experts, top_k = shape
    router = WidthRouter(experts, hidden, len(WIDTHS), kind).requires_grad_(False)
    torch.nn.init.normal_(router.weight, std=hidden**-0.5)
    policy = ServingWidths("router", WIDTHS, capacities)
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    weights, ids = torch.randn(tokens, experts).softmax(-1).topk(top_k, dim=-1)
    ids = ids.int()
    selector, unfused = WidthSelector(0, policy, router), WidthSelector(0, policy, router)
    # The torch ops: what a CPU where the C++ decision cannot be built runs.
    torch_ops = mock.patch.object(width_selection, "_fused_kernel", lambda: None)
    widths = selector(x, weights, ids)
    with torch_ops:
        assert torch.equal(unfused(x, weights, ids), widths)

    def experts_call():
        return layer.forward(x, weights, ids, widths)

    samples = {"experts_ms": [], "decision_ms": [], "decision_warm_ms": [], "decision_torch_ms": []}
    for rep in range(reps + WARMUP):
        # Each decision timed right after a layer call, as in serving (the router's
        # weights out of the caches), less the clock's own cost; then back to back.
        sample = {
            "experts_ms": cpu_ms(experts_call),
            "decision_ms": cpu_ms(lambda: selector(x, weights, ids)) - clock,
            "decision_warm_ms": cpu_ms(lambda: selector(x, weights, ids), inner),
        }
        experts_call()
        with torch_ops:
            sample["decision_torch_ms"] = cpu_ms(lambda: unfused(x, weights, ids)) - clock
        if rep >= WARMUP:
            for key, value in sample.items():
                samples[key].append(value)
    row = {"shape": name, "tokens": tokens, "kind": kind, "capacities": capacities is not None}
    row.update({key: statistics.median(values) for key, values in samples.items()})
    c = row["experts_ms"]
    row.update(
        share=row["decision_ms"] / (row["decision_ms"] + c),
        share_warm=row["decision_warm_ms"] / (row["decision_warm_ms"] + c),
        share_torch=row["decision_torch_ms"] / (row["decision_torch_ms"] + c),
    )
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    labels = [
        f"{r['shape']}\n{r['tokens']} tok, {r['kind']}{', cap' if r['capacities'] else ''}" for r in rows
    ]
    positions = torch.arange(len(rows), dtype=torch.float64)
    ax.bar(positions - 0.27, [100 * r["share_torch"] for r in rows], 0.27, label="torch ops")
    ax.bar(positions, [100 * r["share"] for r in rows], 0.27, label="C++ (served on CPU), after a layer call")
    ax.bar(positions + 0.27, [100 * r["share_warm"] for r in rows], 0.27, label="C++, warm caches")
    ax.axhline(2.0, color="red", linestyle="--", label="2 % bar")
    ax.set_yscale("log")
    ax.set_xticks(positions.tolist(), labels, rotation=90, fontsize=6)
    ax.set(
        ylabel="width decision, % of MoE layer time",
        title="Cost of the bit-width decision (1 thread, per-thread CPU time)",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--inner", type=int, default=10, help="decisions in a row for the warm time")
    parser.add_argument("--out", type=Path, default=RESULTS / "router_cost")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    backend = select_backend("cpu")
    clock = statistics.median(cpu_ms(lambda: None) for _ in range(1000))
    rows = []
    print(
        f"{'shape':16s} {'tokens':>6s} {'kind':>6s} {'cap':>4s} {'torch ops ms':>12s} {'C++ ms':>8s} "
        f"{'C++ warm':>8s} {'experts ms':>11s} {'share torch':>11s} {'share C++':>9s} {'warm':>6s}"
    )
    for shape in SHAPES:
        _, hidden, inter, experts, _ = shape
        layer = LayerExperts(
            random_stacked(2 * inter, hidden, experts), random_stacked(hidden, inter, experts), 8, backend
        )
        for tokens in args.tokens:
            for kind in ("expert", "layer"):
                for capacities in (CAPACITIES, None):
                    row = layer_call(layer, shape, tokens, kind, capacities, args.reps, args.inner, clock)
                    rows.append(row)
                    print(
                        f"{row['shape']:16s} {tokens:6d} {kind:>6s} {'yes' if capacities else 'no':>4s} "
                        f"{row['decision_torch_ms']:12.4f} {row['decision_ms']:8.4f} "
                        f"{row['decision_warm_ms']:8.4f} "
                        f"{row['experts_ms']:11.3f} {row['share_torch']:11.1%} {row['share']:9.2%} "
                        f"{row['share_warm']:6.2%}",
                        flush=True,
                    )
        del layer
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "threads": torch.get_num_threads(),
        "clock": "time.thread_time",
        "clock_cost_ms": clock,
        "backend": backend.NAME,
        "cpu": platform.processor() or platform.machine(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "reps": args.reps,
        "inner": args.inner,
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
