"""An accuracy run's results as ``accuracy.json``, ``accuracy.md`` (tables) and
``accuracy.png`` (perplexity and KL divergence vs bits per weight, one line per method),
with the router's Pareto comparison when router variants were served."""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vllm_d2moe.eval.crosscheck import TOLERANCE
from vllm_d2moe.eval.scoring import TokenScores
from vllm_d2moe.eval.variants import METHODS, REFERENCE, ROUTED_METHODS, Variant

# The issue's bar for MWQ against the independent quantizer at the same width.
MWQ_VS_RTN_TOLERANCE = 0.005
NOTES = (
    "KL divergence is KL(unquantized || model) of the next-token distributions, exact over the "
    "full vocabulary (vLLM prompt_logprobs=-1), averaged over the scored tokens; top-1 is the "
    "share of tokens where both models rank the same token first.",
    "Bits per weight count the routed-expert weights only (all other weights keep the source "
    "dtype in every row), scales and zeros included: MWQ from its checkpoint layout (bytes a "
    "width reads, 64-byte alignment included), RTN as the same layout with a single width, "
    "INT8 as 8 bits plus a float16 scale per output row.",
    "RTN and INT8 are served as fake-quantized checkpoints (expert weights replaced by their "
    "dequantized values, in the source dtype) through vLLM's unquantized path: their accuracy "
    "depends only on the weights, not on the kernel that would read packed codes. MWQ is served "
    "by the d2moe quantization method from one converted checkpoint, at each width.",
    "MWQ's lowest width is its base quantizer, the same round-to-nearest as RTN at that width: "
    "those two rows hold the same weights, served by two different kernels.",
)


@dataclass(frozen=True)
class Setup:
    command: str
    model: str
    dtype: str
    split: str
    windows: int
    window: int
    group_size: int

    @property
    def tokens(self) -> int:
        return self.windows * self.window


def paired_relative_difference(a: TokenScores, b: TokenScores) -> tuple[float, float]:
    """``perplexity(a) / perplexity(b) - 1`` and its standard error, from per-window
    differences of mean NLL (tokens within a window are not independent)."""
    per_window = a.nll.mean(axis=1, dtype=np.float64) - b.nll.mean(axis=1, dtype=np.float64)
    mean = float(per_window.mean())
    error = float(per_window.std(ddof=1) / math.sqrt(len(per_window))) if len(per_window) > 1 else math.nan
    return math.expm1(mean), math.exp(mean) * error


def build_report(
    setup: Setup,
    variants: list[Variant],
    scores: dict[str, TokenScores],
    engines: dict[str, dict],
    transformers_ppl: float,
) -> dict:
    reference = scores.get(REFERENCE)
    rows = []
    for v in variants:
        # Checkpoint paths are left out: all but the source live in a temporary work directory.
        row = {key: value for key, value in asdict(v).items() if key != "model"}
        row.update(engines.get(v.name, {"error": "not run"}))
        if v.name in scores:
            s = scores[v.name]
            row.update(perplexity=s.perplexity, kl=s.mean_kl, top1_agreement=s.top1_agreement)
            row["perplexity_change"] = s.perplexity / reference.perplexity - 1
        rows.append(row)
    report = {"setup": {**asdict(setup), "tokens": setup.tokens}, "variants": rows, "notes": list(NOTES)}
    if reference is not None:
        difference = reference.perplexity / transformers_ppl - 1
        report["crosscheck"] = {
            "vllm_perplexity": reference.perplexity,
            "transformers_perplexity": transformers_ppl,
            "relative_difference": difference,
            "tolerance": TOLERANCE,
            "ok": abs(difference) <= TOLERANCE,
        }
    report["router_pareto"] = router_pareto(rows)
    report["mwq_vs_rtn"] = []
    for v in variants:
        rtn = f"rtn-{v.bits}"
        if v.method == "mwq" and v.name in scores and rtn in scores:
            difference, error = paired_relative_difference(scores[v.name], scores[rtn])
            report["mwq_vs_rtn"].append(
                {
                    "bits": v.bits,
                    "relative_difference": difference,
                    "standard_error": error,
                    "within_tolerance": abs(difference) <= MWQ_VS_RTN_TOLERANCE,
                }
            )
    return report


def _interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear value at ``x`` through sorted ``points``; None outside them."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def router_pareto(rows: list[dict]) -> list[dict]:
    """Each served router point against the fixed MWQ widths at the same bits per weight
    (linear between neighbouring widths) and against its shuffled counterpart (same mix)."""
    scored = [r for r in rows if "perplexity" in r]
    fixed = sorted((r["bits_per_weight"], r["perplexity"], r["kl"]) for r in scored if r["method"] == "mwq")
    by_name = {r["name"]: r for r in scored}
    out = []
    for r in scored:
        if r["method"] != "router":
            continue
        shuffled = by_name.get("shuffled" + r["name"][len("router"):])
        fixed_ppl = _interpolate([(b, p) for b, p, _ in fixed], r["bits_per_weight"])
        fixed_kl = _interpolate([(b, k) for b, _, k in fixed], r["bits_per_weight"])
        out.append({
            "name": r["name"],
            "bits_per_weight": r["bits_per_weight"],
            "perplexity": r["perplexity"],
            "kl": r["kl"],
            "fixed_perplexity": fixed_ppl,
            "fixed_kl": fixed_kl,
            "shuffled_bits_per_weight": shuffled and shuffled["bits_per_weight"],
            "shuffled_perplexity": shuffled and shuffled["perplexity"],
            "shuffled_kl": shuffled and shuffled["kl"],
            "beats_fixed": fixed_ppl is not None and r["perplexity"] < fixed_ppl,
            "beats_shuffled": shuffled is not None and r["perplexity"] < shuffled["perplexity"],
        })
    return out


def _number(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    setup = report["setup"]
    lines = [
        "# Accuracy: MWQ vs baselines",
        "",
        f"- model: `{setup['model']}` ({setup['dtype']})",
        f"- held-out tokens: {setup['tokens']:,} from the `{setup['split']}` split "
        f"({setup['windows']} windows of {setup['window']} scored tokens), group size {setup['group_size']}",
        f"- command: `{setup['command']}`",
        "",
        "| model | bits/weight | perplexity | vs unquantized | KL | top-1 | engine start s | scoring s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["variants"]:
        if "error" in row:
            lines.append(f"| {row['name']} | {_number(row['bits_per_weight'], '.3f')} | failed: {row['error']} ||||||")
            continue
        lines.append(
            f"| {row['name']} | {row['bits_per_weight']:.3f} | {row['perplexity']:.3f} "
            f"| {row['perplexity_change']:+.2%} | {row['kl']:.2e} | {row['top1_agreement']:.2%} "
            f"| {_number(row.get('start_seconds'), '.0f')} | {_number(row.get('score_seconds'), '.0f')} |"
        )
    check = report.get("crosscheck")
    if check:
        lines += [
            "",
            f"**vLLM vs transformers** (unquantized, same tokens): perplexity {check['vllm_perplexity']:.4f} "
            f"vs {check['transformers_perplexity']:.4f}, difference {check['relative_difference']:+.4%} "
            f"(tolerance ±{check['tolerance']:.1%}: {'ok' if check['ok'] else 'FAILED'}).",
        ]
    if report.get("router_pareto"):
        lines += [
            "",
            "**Learned bit-width router vs fixed widths and vs the same width mix dealt at random** "
            "(fixed: MWQ widths interpolated linearly to the router's bits per weight; shuffled: the "
            "router's choices re-dealt at random among each call's pairs):",
            "",
            "| router point | bits/weight | perplexity | KL | fixed ppl | fixed KL | shuffled bits | shuffled ppl "
            "| shuffled KL | beats fixed | beats shuffled |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for row in report["router_pareto"]:
            lines.append(
                f"| {row['name']} | {row['bits_per_weight']:.3f} | {row['perplexity']:.3f} | {row['kl']:.2e} "
                f"| {_number(row['fixed_perplexity'], '.3f')} | {_number(row['fixed_kl'], '.2e')} "
                f"| {_number(row['shuffled_bits_per_weight'], '.3f')} | {_number(row['shuffled_perplexity'], '.3f')} "
                f"| {_number(row['shuffled_kl'], '.2e')} | {'yes' if row['beats_fixed'] else 'no'} "
                f"| {'yes' if row['beats_shuffled'] else 'no'} |"
            )
    if report["mwq_vs_rtn"]:
        lines += [
            "",
            f"**MWQ vs independent round-to-nearest at the same width** (perplexity ratio − 1, "
            f"± standard error over windows; bar ±{MWQ_VS_RTN_TOLERANCE:.1%}):",
            "",
            "| bits | MWQ / RTN − 1 | ± s.e. | within bar |",
            "|---:|---:|---:|---|",
        ]
        for row in report["mwq_vs_rtn"]:
            lines.append(
                f"| {row['bits']} | {row['relative_difference']:+.3%} | {row['standard_error']:.3%} "
                f"| {'yes' if row['within_tolerance'] else 'no'} |"
            )
    lines += ["", "Notes:", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["variants"] if "error" not in r]
    fig, (ppl_ax, kl_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, marker in zip(METHODS + ROUTED_METHODS, "os^Dx"):
        points = sorted((r["bits_per_weight"], r["perplexity"], r["kl"]) for r in rows if r["method"] == method)
        if points:
            x, ppl, kl = zip(*points)
            ppl_ax.plot(x, ppl, marker=marker, label=method.upper())
            kl_ax.plot(x, kl, marker=marker, label=method.upper())
    for r in rows:
        if r["method"] == REFERENCE:
            ppl_ax.axhline(r["perplexity"], color="gray", linestyle="--",
                           label=f"unquantized ({r['bits_per_weight']:.0f} bits)")
    ppl_ax.set(xlabel="bits per expert weight", ylabel="held-out perplexity", title="Perplexity")
    kl_ax.set(xlabel="bits per expert weight", ylabel="KL(unquantized || model), nats/token",
              title="KL divergence", yscale="log")
    for ax in (ppl_ax, kl_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    setup = report["setup"]
    fig.suptitle(f"{Path(setup['model']).name}: {setup['tokens']:,} {setup['split']} tokens, "
                 f"group size {setup['group_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "accuracy.json", out_dir / "accuracy.md", out_dir / "accuracy.png"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(markdown(report))
    plot(report, paths[2])
    return paths
