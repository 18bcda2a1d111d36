"""Compare trained bit-width routers (e.g. one per expert vs one per layer) in the
transformers-side simulation, which serves the same width choices as vLLM
(tests/test_router_serving.py checks that) and runs without an engine.

For each checkpoint holding a router: held-out perplexity and KL against the
checkpoint's widest width, for fixed widths, the router at its capacities,
the shuffled mix, and the router at target average widths. Writes a markdown
table and JSON.

    python benchmarks/router_kinds.py CKPT_EXPERT CKPT_LAYER --out benchmarks/results/router_kinds
"""

import argparse
import json
import math
from pathlib import Path

import torch

from vllm_d2moe.eval.heldout import heldout_windows
from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
from vllm_d2moe.router.assign import shift_for_target
from vllm_d2moe.router.model import RouterSet
from vllm_d2moe.router.policy import ServingWidths
from vllm_d2moe.router.simulate import load_simulated_model, set_mode, simulated_experts


@torch.no_grad()
def score(model, windows: torch.Tensor, mode: str, policy: ServingWidths | None, teacher_bits: int) -> dict:
    layers = simulated_experts(model).values()
    if policy is not None:
        for m in layers:
            m.policy = policy
    nll = kl = 0.0
    chosen = []
    for chunk in windows.split(4):
        inputs, targets = chunk[:, :-1], chunk[:, 1:]
        set_mode(model, f"fixed:{teacher_bits}")
        teacher = model(input_ids=inputs).logits.log_softmax(-1)
        set_mode(model, mode)
        student = model(input_ids=inputs).logits.log_softmax(-1)
        if mode == "serve":
            chosen += [torch.tensor(policy.widths)[m.choice].float() for m in layers]
        kl += (teacher.exp() * (teacher - student)).sum().item()
        nll -= student.gather(-1, targets.unsqueeze(-1)).sum().item()
    tokens = windows[:, 1:].numel()
    average = torch.cat(chosen).mean().item() if chosen else float(mode.split(":")[1])
    return {"average_width": average, "perplexity": math.exp(nll / tokens), "kl": kl / tokens}


def evaluate(checkpoint: Path, windows: torch.Tensor, fixed: list[int], targets: list[float]) -> list[dict]:
    routers = RouterSet.load(checkpoint)
    teacher_bits = MWQCheckpoint(checkpoint).spec.max_bits
    base = ServingWidths("router", routers.widths, routers.capacities, calibration=routers.calibration)
    model = load_simulated_model(checkpoint, base, routers.routers, extra_widths=[*fixed, teacher_bits])
    rows = [{"variant": f"fixed-{b}", **score(model, windows, f"fixed:{b}", None, teacher_bits)} for b in fixed]
    rows.append({"variant": "router", **score(model, windows, "serve", base, teacher_bits)})
    rows.append({"variant": "shuffled", **score(model, windows, "serve",
                                                ServingWidths("shuffled", routers.widths, routers.capacities),
                                                teacher_bits)})
    for target in targets:
        shift = shift_for_target(routers.calibration, target)
        policy = ServingWidths("router", routers.widths, None, shift, routers.calibration)
        rows.append({"variant": f"router-{target:g}", **score(model, windows, "serve", policy, teacher_bits)})
    for row in rows:
        row["kind"] = routers.kind
        row["steps"] = routers.training.get("steps")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--fixed", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--targets", type=float, nargs="*", default=[2.5, 3.0, 3.5])
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    args = parser.parse_args()
    torch.manual_seed(0)  # the shuffled dealing
    windows = heldout_windows(args.checkpoints[0], "valid", args.tokens, args.window)
    rows = [row for ckpt in args.checkpoints for row in evaluate(ckpt, windows, args.fixed, args.targets)]
    lines = [
        f"Held-out valid split, {windows[:, 1:].numel()} tokens; KL against the widest stored width.",
        f"Command: `python benchmarks/router_kinds.py {' '.join(map(str, args.checkpoints))} "
        f"--tokens {args.tokens} --out {args.out}`",
        "",
        "| router kind | steps | variant | average width | perplexity | KL |",
        "|---|---:|---|---:|---:|---:|",
    ]
    lines += [f"| {r['kind']} | {r['steps']} | {r['variant']} | {r['average_width']:.3f} | {r['perplexity']:.3f} "
              f"| {r['kl']:.5f} |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
