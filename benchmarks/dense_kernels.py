"""The ``dense`` option's matmuls against vLLM's own bf16 one, at a model's non-expert shapes, side by side.

For each shape (the output head, and each layer's fused QKV and output projections, one copy per layer so
that together they outgrow the cache as in serving), the median ms per call at 1 / 8 / 16 tokens of:

* vLLM's bf16 GEMM on CPUs (``onednn_mm``, what stock vLLM runs for these layers);
* ``int8``: torch's ``_weight_int8pack_mm`` (weight-only);
* ``int4``: torch's ``_weight_int4pack_mm_for_cpu`` (weight-only, groups of 128);
* ``w8a8``: vLLM's oneDNN int8 GEMM with per-token int8 activations.

Each quantized layer is built and called through ``DenseLinearMethod``, as serving does.

    python benchmarks/dense_kernels.py --model /work/scratch/scale/olmoe-1b-7b-4l --layers 4
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from vllm import _custom_ops as ops

from vllm_d2moe.vllm_glue.dense_method import DENSE_MODES, DenseLinearMethod


def shapes(config: dict, layers: int) -> list[tuple[str, int, int, int]]:
    """(name, out features, in features, copies) of the layers the ``dense`` option quantizes."""
    hidden = config["hidden_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or hidden // heads
    return [
        ("output head", config["vocab_size"], hidden, 1),
        ("qkv_proj", (heads + 2 * kv_heads) * head_dim, hidden, layers),
        ("o_proj", hidden, heads * head_dim, layers),
    ]


def median_ms(calls: list, reps: int) -> float:
    """Median ms per call, the calls taken in turn (each copy once before timing)."""
    for call in calls:
        call()
    times = []
    for rep in range(reps):
        start = time.perf_counter()
        calls[rep % len(calls)]()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint directory (its config.json)")
    parser.add_argument("--layers", type=int, default=None, help="layers (default: the config's)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON of the table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = json.loads((args.model / "config.json").read_text())
    layers = args.layers or config["num_hidden_layers"]
    rows = []
    print(f"{'layer':<12} {'tokens':>6} {'bf16 ms':>8} " + " ".join(f"{m + ' ms (x)':>16}" for m in DENSE_MODES))
    for name, n, k, copies in shapes(config, layers):
        weights = [torch.randn(n, k, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        bf16 = [ops.create_onednn_mm(w.t(), 32) for w in weights]
        quantized = {}
        for mode in DENSE_MODES:
            quantized[mode] = []
            for w in weights:
                layer, method = torch.nn.Module(), DenseLinearMethod(mode, name)
                layer.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
                method.process_weights_after_loading(layer)
                if not method.quantized:
                    raise SystemExit(f"{name} [{n}, {k}] cannot be quantized to {mode}")
                quantized[mode].append((layer, method))
        del weights
        for tokens in args.tokens:
            x = torch.randn(tokens, k, dtype=torch.bfloat16)
            base = median_ms([lambda h=h, x=x: ops.onednn_mm(h, x, None) for h in bf16], args.reps)
            row = {"layer": name, "shape": [n, k], "copies": copies, "tokens": tokens, "bf16_ms": base}
            for mode, mode_layers in quantized.items():
                row[f"{mode}_ms"] = median_ms([lambda lm=lm, x=x: lm[1].apply(lm[0], x) for lm in mode_layers],
                                              args.reps)
            rows.append(row)
            print(f"{name:<12} {tokens:>6} {base:>8.3f} "
                  + " ".join(f"{row[m + '_ms']:>8.3f} ({base / row[m + '_ms']:.2f}x)" for m in DENSE_MODES),
                  flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": str(args.model), "layers": layers, "threads": args.threads,
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
