"""Error of one projection's lookup path (``cpu_bitplanes``' bfloat16 tables) against the product of the same MWQ
weights, next to the weights' own quantization error and to int8 activations per 128-column group (``cpu_int8``'s
rounding, simulated), RMS relative to the exact float product: a random 256 x 2048 projection in groups of 128
(OLMoE's hidden size), 4 tokens with one outlier channel, every width. Not a kernel benchmark: a check of sizes.

    python benchmarks/probes/lookup_error.py
"""

import torch

from vllm_d2moe.kernels import cpu_bitplanes
from vllm_d2moe.mwq.quantize import MWQSpec, dequantize, quantize
from vllm_d2moe.mwq.stacked import StackedProjection


def rms(t: torch.Tensor) -> float:
    return t.pow(2).mean().sqrt().item()


def int8_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    g = x.float().reshape(x.shape[0], -1, group)
    amax = g.abs().amax(-1, keepdim=True)
    return (torch.round(g * (127 / amax)) * (amax / 127)).reshape(x.shape).double()


def main() -> None:
    torch.manual_seed(0)
    spec, rows, cols, tokens = MWQSpec(2, 8, 128), 256, 2048, 4
    weight = torch.randn(rows, cols) * 0.05
    t = quantize(weight, spec)
    stacked = StackedProjection.allocate(t, 1, "cpu")
    stacked.store(0, t)
    resident = cpu_bitplanes.prepare(stacked)
    x = torch.randn(tokens, cols)
    x[:, 7] *= 20  # an outlier channel, as hidden states have
    exact = x.double() @ weight.double().T
    print(f"build {cpu_bitplanes.choose_isa()[0]}; RMS error / RMS output")
    print("| width | planes on two table parts | weights' quantization | lookup tables | int8 activations |")
    print("|---:|---:|---:|---:|---:|")
    for bits in spec.widths:
        w = dequantize(stacked.expert(0, bits)).double()
        want = x.double() @ w.T
        out = torch.empty(tokens, rows)
        cpu_bitplanes.linear(x, resident, 0, bits, out)
        two_part_planes = cpu_bitplanes.lookup_plan(cols, spec.group_size, bits)[1]
        errors = [want - exact, out.double() - want, int8_activations(x, 128) @ w.T - want]
        print(f"| {bits} | {two_part_planes} | " + " | ".join(f"{rms(e) / rms(exact):.2e}" for e in errors) + " |")


if __name__ == "__main__":
    main()
