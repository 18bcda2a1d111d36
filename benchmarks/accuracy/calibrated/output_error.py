"""Output error per width of calibrated MWQ against round-to-nearest MWQ and a non-nested
calibrated quantizer of each width, on the reference model's routed experts.

    python benchmarks/accuracy/calibrated/output_error.py [--calibration-tokens 8192]

Every expert's ``H = X^T X`` is collected from the reference corpus's train split as
``d2moe convert --calibrate`` collects it (``converters/calibration.py``); the errors
``tr((W - Q) H (W - Q)^T)`` are on those same inputs (in-sample), summed over the
experts a calibration token reached, per projection. Writes ``output_error.json``
beside this file and prints the table after every layer (``output_error.md`` quotes it).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODEL = HERE.parents[2] / "vllm_d2moe" / "assets" / "reference-small"
WIDTHS = (2, 3, 4, 5, 6, 7, 8)
GROUP = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--experts", type=int, default=None, help="experts 0..N-1 of each layer (those reached)")
    parser.add_argument("--non-nested-widths", type=int, nargs="*", default=list(WIDTHS))
    args = parser.parse_args()

    from vllm_d2moe.converters.calibration import ExpertInputs, calibration_tokens
    from vllm_d2moe.converters.convert import SourceFiles, plan_conversion
    from vllm_d2moe.mwq.calibrate import calibrated_quantize, output_error
    from vllm_d2moe.mwq.quantize import MWQSpec, dequantize, quantize

    plan = plan_conversion(MODEL)
    source = SourceFiles(plan.src, plan.files)
    tokens = calibration_tokens(MODEL, plan.config["vocab_size"], args.calibration_tokens)
    inputs = ExpertInputs(plan, source, tokens.tokens)
    nested = MWQSpec(WIDTHS[0], WIDTHS[-1], GROUP)
    guards = {"calibrated": None, "calibrated, guarded to 4": 4}
    methods = ("rtn", *guards, "non-nested")
    errors = {proj: {m: [0.0] * len(WIDTHS) for m in methods} for proj in ("gate_up", "down")}
    seconds = {m: 0.0 for m in methods[1:]}
    for layer, experts in plan.experts.layers.items():
        statistics = inputs.layer(layer)
        for e, expert in enumerate(experts):
            if statistics.tokens[e] == 0 or args.experts is not None and e >= args.experts:
                continue
            weights = {"gate_up": torch.cat([source.matrix(p) for p in expert.gate_up]),
                       "down": source.matrix(expert.down)}
            for proj, weight in weights.items():
                hessian = getattr(statistics, proj)[e]
                fitted = {"rtn": quantize(weight, nested)}
                for method, guard in guards.items():
                    start = time.perf_counter()
                    (fitted[method],) = calibrated_quantize(weight, hessian, nested, guarded_up_to=guard)
                    seconds[method] += time.perf_counter() - start
                for i, b in enumerate(WIDTHS):
                    if b in args.non_nested_widths:
                        start = time.perf_counter()
                        (fitted["non-nested"],) = calibrated_quantize(weight, hessian, MWQSpec(b, b, GROUP))
                        seconds["non-nested"] += time.perf_counter() - start
                    for method in methods:
                        if method == "non-nested" and b not in args.non_nested_widths:
                            errors[proj][method][i] = None
                            continue
                        tensor = fitted[method] if method == "non-nested" else fitted[method].truncate(b)
                        errors[proj][method][i] += output_error(weight, dequantize(tensor), hessian)
        report = {"command": " ".join(sys.argv), "calibration_tokens": int(tokens.tokens.numel()),
                  "experts_per_layer": args.experts, "layers_done": layer + 1, "widths": WIDTHS,
                  "errors": errors, "seconds": {k: round(v, 1) for k, v in seconds.items()}}
        (HERE / "output_error.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"after layer {layer}:\n{table(errors, methods)}", flush=True)
    source.close()
    print(f"seconds (one thread of 2 shared cores): {report['seconds']}")


def table(errors: dict, methods: tuple) -> str:
    lines = ["| projection | quantizer / round-to-nearest MWQ | " + " | ".join(map(str, WIDTHS)) + " |",
             "|---|---|" + "---:|" * len(WIDTHS)]
    for proj, by_method in errors.items():
        for method in methods[1:]:
            ratios = ["-" if a is None else f"{a / r:.3f}" for a, r in zip(by_method[method], by_method["rtn"])]
            lines.append(f"| {proj} | {method} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
