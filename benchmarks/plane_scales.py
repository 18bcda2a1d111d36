"""Coded plane scales (checkpoint format 2) against float16 ones (format 1), on the weights alone.

For every routed-expert matrix of a model (default: the embedded reference model):

* the ratio of each plane's least-squares scale (the mean absolute residual, fitted to the
  decoded scales of the planes below) to ``s * 2**-(j + 2)``, the value the 4-bit codes are
  centred on (``vllm_d2moe/mwq/plane_scales.py``): quantiles per plane;
* the relative squared weight error ``|W - W_b|^2 / |W|^2`` at every width, with the planes'
  scales stored as float16 (format 1, the formula of its quantizer) and as 4-bit codes
  (``quantize``, format 2);
* bits per weight per width from the checkpoint layout (every stored byte of an expert's
  width-b prefix, 64-byte alignment included) for the model's shape and for OLMoE-1B-7B's
  and Mixtral-8x7B's, against llama.cpp's q8_0 (8.5) and q4_K_M (4.84).

Prints the tables and writes benchmarks/results/plane_scales.json; the accuracy measured
through ``d2moe eval`` before and after is in benchmarks/results/plane_scales.md.

    python benchmarks/plane_scales.py [--model DIR] [--group-size 128]
"""

import argparse
import json
from pathlib import Path

import safetensors.torch
import torch

from vllm_d2moe.demo import EMBEDDED_MODEL
from vllm_d2moe.mwq.layout import ExpertLayout
from vllm_d2moe.mwq.quantize import MWQSpec, dequantize, quantize

RESULTS = Path(__file__).parent / "results"
SHAPES = {"OLMoE-1B-7B": (2048, 1024), "Mixtral-8x7B": (4096, 14336)}
QUANTILES = (0.0, 0.001, 0.01, 0.5, 0.99, 0.999, 1.0)


def float16_scale_errors(w: torch.Tensor, spec: MWQSpec) -> list[float]:
    """Squared error per width with float16 plane scales (format 1's quantizer, same base)."""
    q = quantize(w, MWQSpec(spec.min_bits, spec.min_bits, spec.group_size))
    x = w.double().reshape(w.shape[0], -1, spec.group_size)
    residual = x - dequantize(q, torch.float64).reshape(x.shape)
    errors = [float((residual**2).sum())]
    for _ in range(spec.max_bits - spec.min_bits):
        alpha = residual.abs().mean(-1, keepdim=True).half().double()
        residual = residual - alpha * torch.where(residual >= 0, 1.0, -1.0)
        errors.append(float((residual**2).sum()))
    return errors


def coded_scale_errors(w: torch.Tensor, spec: MWQSpec) -> list[float]:
    """Squared error per width with 4-bit plane scale codes (``quantize``, format 2)."""
    q = quantize(w, spec)
    return [float(((dequantize(q.truncate(b), torch.float64) - w.double()) ** 2).sum()) for b in spec.widths]


def optimal_ratios(w: torch.Tensor, spec: MWQSpec) -> list[torch.Tensor]:
    """Each plane's least-squares scale over ``s * 2**-(j + 2)``, fitted on the coded planes below."""
    q = quantize(w, spec)
    x = w.double().reshape(w.shape[0], -1, spec.group_size)
    s = q.base_scale.double()
    out = []
    for j in range(spec.max_bits - spec.min_bits):
        residual = x - dequantize(q.truncate(spec.min_bits + j), torch.float64).reshape(x.shape)
        out.append(residual.abs().mean(-1) / (s * 2.0 ** -(j + 2)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=EMBEDDED_MODEL)
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    spec = MWQSpec(2, 8, args.group_size)
    state = safetensors.torch.load_file(args.model / "model.safetensors")
    matrices = [t for name, t in sorted(state.items()) if ".experts." in name and t.dim() == 2]
    weights_norm = sum(float((m.double() ** 2).sum()) for m in matrices)

    old, new = [0.0] * len(spec.widths), [0.0] * len(spec.widths)
    ratios = [[] for _ in range(spec.max_bits - spec.min_bits)]
    for m in matrices:
        for i, e in enumerate(float16_scale_errors(m, spec)):
            old[i] += e
        for i, e in enumerate(coded_scale_errors(m, spec)):
            new[i] += e
        for j, r in enumerate(optimal_ratios(m, spec)):
            ratios[j].append(r.flatten())

    print(f"{len(matrices)} expert matrices of {args.model}, group size {spec.group_size}\n")
    print("least-squares plane scale / (s * 2^-(j+2)), quantiles " + " ".join(f"{q:g}" for q in QUANTILES))
    ratio_rows = []
    for j, r in enumerate(ratios):
        values = torch.quantile(torch.cat(r), torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
        ratio_rows.append(values)
        print(f"  plane {j + 1}: " + " ".join(f"{v:.3f}" for v in values))

    print("\n| width | rel. sq. error, float16 scales | 4-bit codes | change |")
    print("|---:|---:|---:|---:|")
    error_rows = []
    for b, o, n in zip(spec.widths, old, new):
        error_rows.append({"bits": b, "float16": o / weights_norm, "coded": n / weights_norm})
        print(f"| {b} | {o / weights_norm:.4e} | {n / weights_norm:.4e} | {100 * (n / o - 1):+.2f}% |")

    config = json.loads((args.model / "config.json").read_text())
    shapes = {args.model.name: (config["hidden_size"], config["intermediate_size"]), **SHAPES}
    print("\n| shape | " + " | ".join(f"MWQ-{b}" for b in spec.widths) + " |")
    print("|---|" + "---:|" * len(spec.widths))
    bits_rows = {}
    for name, (hidden, inter) in shapes.items():
        layout = ExpertLayout(spec, hidden, inter)
        bits_rows[name] = {b: 8 * layout.nbytes(b) / (3 * hidden * inter) for b in spec.widths}
        print(f"| {name} {hidden}x{inter} | " + " | ".join(f"{v:.4f}" for v in bits_rows[name].values()) + " |")

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "plane_scales.json").write_text(
        json.dumps(
            {
                "model": str(args.model),
                "group_size": spec.group_size,
                "ratio_quantiles": {"quantiles": QUANTILES, "per_plane": ratio_rows},
                "weight_error": error_rows,
                "bits_per_weight": bits_rows,
            },
            indent=1,
        )
    )
    print(f"\nwrote {RESULTS / 'plane_scales.json'}")


if __name__ == "__main__":
    main()
