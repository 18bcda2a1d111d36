"""The bit-width router's Pareto curve: KL, perplexity and top-1 agreement against
average width, for trained routers, the fixed MWQ widths, the same mix dealt at
random (shuffled), and random mixes of two neighbouring widths.

Runs the transformers-side simulation (:mod:`vllm_d2moe.router.simulate`, which
serves the same widths as vLLM: tests/test_router_serving.py) on held-out
windows, against the unquantized model's own distributions. Each router is
served at a sweep of target average widths (its calibrated shift, no
capacities: the batch-independent rule); each point's KL is compared with the
fixed widths linearly interpolated at the point's measured average width. The
goal (issue 19): at most 0.75x at targets 2.5, 3.0 and 3.5.

    python benchmarks/router_pareto.py vllm_d2moe/assets/reference-small \\
        --router error=CKPT_A --router kl=CKPT_B --out benchmarks/results/router_pareto
"""

import argparse
import json
import math
from pathlib import Path

import torch

from vllm_d2moe.eval.heldout import heldout_windows
from vllm_d2moe.router.assign import shift_for_target
from vllm_d2moe.router.model import RouterSet
from vllm_d2moe.router.policy import ServingWidths
from vllm_d2moe.router.simulate import load_simulated_model, set_mode, simulated_experts

GOAL_BITS = (2.5, 3.0, 3.5)
GOAL_RATIO = 0.75


class RandomMix(torch.nn.Module):
    """A stand-in router that gives each pair a random width, ``fractions[k]`` of them width k."""

    def __init__(self, fractions: list[float], generator: torch.Generator):
        super().__init__()
        self.fractions = torch.tensor(fractions)
        self.generator = generator

    def forward(self, x, topk_weights, topk_ids):
        draw = torch.multinomial(self.fractions, topk_ids.numel(), replacement=True, generator=self.generator)
        logits = torch.full((topk_ids.numel(), len(self.fractions)), -1e9)
        logits[torch.arange(draw.numel()), draw] = 0.0
        return logits.view(*topk_ids.shape, -1)


@torch.inference_mode()
def score(model, windows: torch.Tensor, reference: list[torch.Tensor], mode: str) -> dict:
    """KL(reference || model), perplexity and top-1 agreement per scored token, and the average width."""
    layers = simulated_experts(model).values()
    set_mode(model, mode)
    nll = kl = agree = 0.0
    widths = []
    for chunk, ref in zip(windows.split(4), reference):
        inputs, targets = chunk[:, :-1], chunk[:, 1:]
        student = model(input_ids=inputs, use_cache=False).logits.float().log_softmax(-1)
        if mode == "serve":
            widths += [torch.tensor(m.policy.widths)[m.choice].float() for m in layers]
        kl += (ref.exp() * (ref - student)).sum().item()
        nll -= student.gather(-1, targets.unsqueeze(-1)).sum().item()
        agree += (student.argmax(-1) == ref.argmax(-1)).sum().item()
    tokens = windows[:, 1:].numel()
    average = torch.cat(widths).mean().item() if widths else float(mode.split(":")[1])
    return {"average_width": average, "kl": kl / tokens, "perplexity": math.exp(nll / tokens),
            "top1": agree / tokens}


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear value at ``x`` through ``points`` sorted by x; None outside them."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def sweep(model, windows, reference, routers: dict[str, RouterSet], fixed: list[int], targets: list[float],
          seed: int):
    """Yields the scored rows, most telling first: fixed widths, routers, random mixes, shuffled."""
    layers = simulated_experts(model)
    for b in fixed:
        yield {"series": "fixed", "label": f"fixed-{b}", **score(model, windows, reference, f"fixed:{b}")}
    for mode in ("router", "random mix", "shuffled"):
        if mode == "random mix":
            yield from _random_mixes(model, windows, reference, tuple(sorted(fixed)), seed)
            continue
        for label, router_set in routers.items():
            for layer, m in layers.items():
                m.router = router_set.routers[layer]
            for target in targets:
                torch.manual_seed(seed)  # the shuffled dealing
                shift = shift_for_target(router_set.calibration, target)
                for m in layers.values():
                    m.policy = ServingWidths(mode, router_set.widths, None, shift, router_set.calibration)
                series = label if mode == "router" else f"{label} shuffled"
                yield {"series": series, "label": f"{series} @{target:g}", "target": target,
                       **score(model, windows, reference, "serve")}


def _random_mixes(model, windows, reference, widths: tuple[int, ...], seed: int):
    """A random mix of the two fixed widths around each goal, in the proportions that average to it."""
    generator = torch.Generator().manual_seed(seed)
    for goal in GOAL_BITS:
        low = max((b for b in widths if b <= goal), default=None)
        high = min((b for b in widths if b >= goal), default=None)
        if low is None or high is None or low == high:
            continue
        fractions = [0.0] * len(widths)
        fractions[widths.index(high)] = (goal - low) / (high - low)
        fractions[widths.index(low)] = 1.0 - fractions[widths.index(high)]
        for m in simulated_experts(model).values():
            m.router = RandomMix(fractions, generator)
            m.policy = ServingWidths("router", widths)
        yield {"series": "random mix", "label": f"random mix {low}/{high} @{goal:g}",
               **score(model, windows, reference, "serve")}


def compare(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Per point: the fixed widths' KL and perplexity at its measured average width, and the
    ratio. The goal rows: each router series' points served at the goal widths."""
    fixed = sorted((r["average_width"], r["kl"], r["perplexity"]) for r in rows if r["series"] == "fixed")
    for r in rows:
        r["fixed_kl"] = interpolate([(b, k) for b, k, _ in fixed], r["average_width"])
        r["fixed_perplexity"] = interpolate([(b, p) for b, _, p in fixed], r["average_width"])
        r["kl_vs_fixed"] = r["fixed_kl"] and r["kl"] / r["fixed_kl"]
    goals = [{**r, "met": r["kl_vs_fixed"] is not None and r["kl_vs_fixed"] <= GOAL_RATIO}
             for r in rows if r.get("target") in GOAL_BITS]
    return rows, goals


def _number(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown(rows: list[dict], goals: list[dict], routers: dict[str, RouterSet], command: str, tokens: int) -> str:
    lines = [
        "# Bit-width router: Pareto curve on the reference model",
        "",
        f"Held-out valid split, {tokens} scored tokens, transformers-side simulation (the widths vLLM serves); "
        "KL(unquantized || model) per token, perplexity, top-1 agreement with the unquantized model. "
        "Routers served at their calibrated shift for each target (no capacities). `fixed at same bits`: the "
        "fixed widths linearly interpolated at the point's measured average width (the cost of a random mix "
        "of the two neighbouring widths if errors add; the `random mix` rows measure that).",
        "",
        f"Command: `{command}`",
        "",
        "Routers: " + "; ".join(f"`{label}`: objective {r.training.get('objective', 'kl')}, kind {r.kind}, "
                                f"{r.training.get('steps')} steps" for label, r in routers.items()),
        "",
        "## Goal: router KL at most 0.75x the fixed widths' at the same measured average width",
        "",
        "| router | target | measured average width | router KL | fixed KL at that width | ratio | router ppl "
        "| fixed ppl | met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [f"| {g['series']} | {g['target']:g} | {g['average_width']:.3f} | {g['kl']:.5f} | "
              f"{_number(g['fixed_kl'], '.5f')} | {_number(g['kl_vs_fixed'], '.2f')}x | {g['perplexity']:.3f} | "
              f"{_number(g['fixed_perplexity'], '.3f')} | {'yes' if g['met'] else 'no'} |" for g in goals]
    lines += [
        "",
        "## Every point",
        "",
        "| series | point | average width | KL | fixed KL at same bits | KL / fixed | perplexity | top-1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['series']} | {r['label']} | {r['average_width']:.3f} | {r['kl']:.5f} | "
              f"{_number(r['fixed_kl'], '.5f')} | {_number(r['kl_vs_fixed'], '.2f')} | {r['perplexity']:.3f} | "
              f"{100 * r['top1']:.2f}% |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for series in dict.fromkeys(r["series"] for r in rows):
        points = sorted((r["average_width"], r["kl"], r["perplexity"]) for r in rows if r["series"] == series)
        style = {"fixed": "k-s", "random mix": "kx"}.get(series, "--o" if "shuffled" in series else "-o")
        for axis, column in zip(axes, (1, 2)):
            axis.plot([p[0] for p in points], [p[column] for p in points], style, label=series, markersize=4)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("KL(unquantized || model) per token")
    axes[1].set_ylabel("perplexity")
    for axis in axes:
        axis.set_xlabel("average expert width (bits)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Bit-width router vs fixed widths (reference model, held-out text)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the unquantized model the checkpoints were converted from")
    parser.add_argument("--router", action="append", required=True, metavar="LABEL=CKPT",
                        help="a d2moe checkpoint holding a router (repeatable; the first one's experts are used)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--fixed", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--targets", type=float, nargs="+", default=[2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 3.75])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.md, OUT.json and OUT.png")
    args = parser.parse_args()
    checkpoints = {}
    for spec in args.router:
        label, sep, path = spec.partition("=")
        if not sep or not label:
            raise SystemExit(f"router_pareto: --router {spec!r} must be LABEL=CKPT")
        checkpoints[label] = Path(path)
    routers = {label: RouterSet.load(path) for label, path in checkpoints.items()}
    first = next(iter(routers.values()))
    policy = ServingWidths("router", first.widths, calibration=first.calibration)
    model = load_simulated_model(next(iter(checkpoints.values())), policy, first.routers, extra_widths=args.fixed)
    windows = heldout_windows(args.model, "valid", args.tokens, args.window)
    from transformers import AutoModelForCausalLM

    unquantized = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = [unquantized(input_ids=chunk[:, :-1], use_cache=False).logits.float().log_softmax(-1)
                     for chunk in windows.split(4)]
    del unquantized
    command = ("python benchmarks/router_pareto.py " + str(args.model) + "".join(f" --router {s}" for s in args.router)
               + f" --tokens {args.tokens} --targets {' '.join(f'{t:g}' for t in args.targets)} --out {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for row in sweep(model, windows, reference, routers, args.fixed, args.targets, args.seed):
        rows.append(row)
        print(row, flush=True)
        write(rows, routers, command, windows[:, 1:].numel(), args.out)  # a stopped run keeps what it measured
    print(args.out.with_suffix(".md").read_text())


def write(rows: list[dict], routers: dict[str, RouterSet], command: str, tokens: int, out: Path) -> None:
    rows, goals = compare([dict(r) for r in rows])
    out.with_suffix(".md").write_text(markdown(rows, goals, routers, command, tokens))
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows, "goals": goals}, indent=1)
                                        + "\n")
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
