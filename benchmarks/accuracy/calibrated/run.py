"""Calibrated MWQ against uncalibrated MWQ, non-nested calibrated (GPTQ-style) quantizers
and llama.cpp's k-quants, on the reference model's held-out text.

    python benchmarks/accuracy/calibrated/run.py [--tokens 4096] [--work DIR]

Checkpoints (``d2moe convert``): MWQ 2..8 round-to-nearest; MWQ 2..8 with
``--calibrate`` (every width guarded: none worse than round-to-nearest in output error;
``output_error.py`` measures the narrower guard of ``calibrated_quantize(guarded_up_to=...)``,
which ``d2moe convert`` does not offer); for each width B
a checkpoint with ``min_bits == max_bits == B`` and ``--calibrate`` (the calibrated
base alone: GPTQ at one width, no nesting).
All of them, and the unquantized model, are scored through ``d2moe eval``'s
scoring (vLLM prompt log-probs, KL and top-1 against the unquantized model);
llama.cpp's GGUF quantizations (``peers`` extra) against the same saved reference
log-probs. Writes ``accuracy.md`` and ``accuracy.json`` beside this file.
"""

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks/: peers.py

WIDTHS = (2, 3, 4, 8)
LLAMA = {2: "q2_K", 3: "q3_K_M", 4: "q4_K_M", 8: "q8_0"}
MODEL = HERE.parents[2] / "vllm_d2moe" / "assets" / "reference-small"


def checkpoints(work: Path, tokens: int, non_nested: bool) -> dict:
    """Every compared checkpoint; the calibration text is tokenized once (saved as ids)."""
    from vllm_d2moe.converters.calibration import calibration_tokens
    from vllm_d2moe.converters.convert import convert
    from vllm_d2moe.mwq.quantize import MWQSpec

    text = work / "calibration.jsonl"
    if not text.is_file():
        config = json.loads((MODEL / "config.json").read_text())
        ids = calibration_tokens(MODEL, config["vocab_size"], tokens)
        text.write_text("".join(json.dumps({"input_ids": row.tolist()}) + "\n" for row in ids.tokens))
    made, seconds = {}, {}
    plans = {"mwq": (MWQSpec(2, 8, 128), None), "mwq-cal": (MWQSpec(2, 8, 128), tokens)}
    if non_nested:
        plans |= {f"gptq-{b}": (MWQSpec(b, b, 128), tokens) for b in WIDTHS}
    for name, (spec, calibration) in plans.items():
        if (work / name / "config.json").is_file():  # kept from an earlier run of this script
            made[name], seconds[name] = work / name, None
            continue
        start = time.perf_counter()
        counts = {}
        made[name] = convert(MODEL, work / name, spec, overwrite=True, progress=False, counts=counts,
                             calibration_tokens_requested=calibration,
                             calibration_text=[text] if calibration else None)
        seconds[name] = round(time.perf_counter() - start, 1)
        print(f"{name}: converted in {seconds[name]} s; uncalibrated experts {counts.get('uncalibrated_experts')}",
              flush=True)
    from vllm_d2moe.mwq.checkpoint import MWQCheckpoint

    source = MWQCheckpoint(made["mwq-cal"]).source["calibration"]
    return {"dirs": made, "seconds": seconds, "uncalibrated": source["uncalibrated_experts"]}


def llama_results(work: Path, scores_dir: Path, widths: list[int]) -> dict:
    from vllm_d2moe.eval.scoring import REFERENCE_FILE

    import peers

    version = peers.llama_cpp_version()
    if version is None:
        return {}
    cache = Path.home() / ".cache" / "vllm_d2moe" / "scale"  # the converter vendored from the sdist
    converter = peers.vendored_converter(version, cache)
    quants = [LLAMA[b] for b in widths]
    peers.LLAMA_QUANTS = ("f16", *quants)
    files = peers.gguf_files(MODEL, converter, work)
    out = {}
    for quant in quants:
        result = peers.llama_quality({"model": str(files[quant]), "windows": str(scores_dir / "windows.npy"),
                                      "reference": str(scores_dir / REFERENCE_FILE), "threads": 2})
        result["bits_per_weight"] = peers.gguf_expert_stats(files[quant], converter)["expert_bits_per_weight"]
        out[quant] = result
        print(f"llama.cpp {quant}: {result}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored")
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--work", type=Path, default=Path("/tmp/d2moe-calibrated"))
    parser.add_argument("--skip-non-nested", action="store_true",
                        help="leave out the non-nested calibrated checkpoints (a calibration each)")
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS), choices=WIDTHS,
                        help="widths scored; rows of other widths are kept from an earlier run's "
                        "accuracy.json of the same tokens")
    parser.add_argument("--llama", action="store_true",
                        help="measure llama.cpp's k-quants (peers extra) instead of quoting peers.md")
    args = parser.parse_args()

    from vllm_d2moe.eval.heldout import heldout_windows
    from vllm_d2moe.eval.scoring import score_with_vllm
    from vllm_d2moe.eval.variants import REFERENCE, Variant, model_dtype, stored_bits_per_weight
    from vllm_d2moe.mwq.checkpoint import QUANT_METHOD, MWQCheckpoint

    args.work.mkdir(parents=True, exist_ok=True)
    windows = heldout_windows(MODEL, "valid", args.tokens, 256)
    made = checkpoints(args.work, args.calibration_tokens, not args.skip_non_nested)
    dirs = made["dirs"]

    def variant(name: str, model: Path, bits: int) -> Variant:
        layouts = [(e.layout, e.num_experts) for e in MWQCheckpoint(model).layers.values()]
        return Variant(name, "mwq", bits, str(model), stored_bits_per_weight(layouts, bits), quantization=QUANT_METHOD,
                       hf_overrides={"quantization_config": {"quant_method": QUANT_METHOD, "bits": bits}})

    variants = [Variant(REFERENCE, REFERENCE, None, str(MODEL), 16.0)]
    for b in args.widths:
        variants += [variant(f"mwq-{b}", dirs["mwq"], b), variant(f"mwq-cal-{b}", dirs["mwq-cal"], b)]
        if f"gptq-{b}" in dirs:
            variants.append(variant(f"gptq-{b}", dirs[f"gptq-{b}"], b))
    scores_dir = args.work / "scores"
    scores, engines = score_with_vllm(variants, windows, model_dtype(MODEL), scores_dir, save_reference=True)
    rows = {v.name: {"perplexity": scores[v.name].perplexity, "kl": scores[v.name].mean_kl,
                     "top1": scores[v.name].top1_agreement, "bits_per_weight": v.bits_per_weight}
            if v.name in scores else {"error": engines.get(v.name, {}).get("error", "not run")}
            for v in variants}
    report = {"command": " ".join(sys.argv), "model": str(MODEL), "tokens": int(windows.shape[0] * 256),
              "calibration_tokens": args.calibration_tokens, "convert_seconds": made["seconds"],
              "uncalibrated_experts": made["uncalibrated"], "vllm": rows, "llama.cpp": PEERS_MD}
    earlier = json.loads((HERE / "accuracy.json").read_text()) if (HERE / "accuracy.json").is_file() else {}
    same = all(earlier.get(k) == report[k] for k in ("tokens", "calibration_tokens"))
    if same:  # the other widths' rows (each run scores the same unquantized reference anew)
        report["vllm"] = {**earlier["vllm"], **rows}
        report["command"] = f"{earlier['command']}; {report['command']}"
    write(report)  # before llama.cpp, which a stopped run may not reach
    if args.llama:
        measured = {k: v for k, v in earlier.get("llama.cpp", {}).items() if same and "from" not in v}
        report["llama.cpp"] = {**PEERS_MD, **measured, **llama_results(args.work, scores_dir, args.widths)}
        write(report)


# llama.cpp on the same 4096 held-out tokens against the same unquantized vLLM model, from
# benchmarks/results/peers.md (2026-11-24), when this run does not measure it (no q3_K_M there).
PEERS_MD = {
    "q2_K": {"kl": 0.0192, "top1": 0.889, "perplexity": 94.64, "bits_per_weight": 2.90, "from": "peers.md"},
    "q4_K_M": {"kl": 0.0021, "top1": 0.964, "perplexity": 92.32, "bits_per_weight": 4.84, "from": "peers.md"},
    "q8_0": {"kl": 0.0004, "top1": 0.987, "perplexity": 92.26, "bits_per_weight": 8.50, "from": "peers.md"},
}


def write(report: dict) -> None:
    (HERE / "accuracy.json").write_text(json.dumps(report, indent=1) + "\n")
    (HERE / "accuracy.md").write_text(markdown(report))
    print((HERE / "accuracy.md").read_text(), flush=True)


def _cell(row: dict | None) -> str:
    if not row:
        return "not run | | | "
    if "error" in row:
        return f"error: {row['error'][:40]} | | | "
    return f"{row['kl']:.4f} | {100 * row['top1']:.1f}% | {row['perplexity']:.2f} | {row['bits_per_weight']:.2f}"


def markdown(report: dict) -> str:
    vllm, llama = report["vllm"], report["llama.cpp"]
    lines = [
        "# Calibrated MWQ on the reference model",
        "",
        f"Command: `{report['command']}`; {report['tokens']} held-out tokens (valid split, windows of 256), "
        f"calibration on {report['calibration_tokens']} tokens of the train split. KL and top-1 against the "
        "unquantized model served by vLLM; bits per weight of the routed experts, scales included.",
        "",
        "| width | method | KL | top-1 | perplexity | bits/w |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    unq = vllm.get("unquantized", {})
    if "perplexity" in unq:
        lines.append(f"| 16 | unquantized | 0 | 100% | {unq['perplexity']:.2f} | 16.00 |")
    for b in WIDTHS:
        for name, label in ((f"mwq-{b}", "MWQ round-to-nearest (nested)"),
                            (f"mwq-cal-{b}", "MWQ calibrated, every width guarded (nested)"),
                            (f"gptq-{b}", "calibrated, not nested")):
            lines.append(f"| {b} | {label} | {_cell(vllm.get(name))} |")
        quant = LLAMA[b]
        row = llama.get(quant)
        if row and "kl" in row:
            source = " (peers.md)" if row.get("from") else ""
            lines.append(f"| {b} | llama.cpp {quant}{source} | {row['kl']:.4f} | {100 * row['top1']:.1f}% | "
                         f"{row['perplexity']:.2f} | {row['bits_per_weight']:.2f} |")
        else:
            lines.append(f"| {b} | llama.cpp {quant} | not run | | | |")
    lines += ["", f"Conversion seconds (2 shared cores): {report['convert_seconds']}; experts no calibration "
              f"token reached (uncalibrated fit): {report['uncalibrated_experts']}", "", "## Goals", ""]
    lines += goals(vllm, llama)
    return "\n".join(lines) + "\n"


def goals(vllm: dict, llama: dict) -> list[str]:
    out = []
    calibrated = {"mwq-cal": "calibrated MWQ"}
    for prefix, label in calibrated.items():
        for b, quant in ((2, "q2_K"), (3, "q3_K_M")):
            ours, peer = vllm.get(f"{prefix}-{b}", {}), llama.get(quant, {})
            if "kl" in ours and "kl" in peer:
                met = ours["kl"] <= peer["kl"] and ours["bits_per_weight"] <= peer["bits_per_weight"]
                out.append(f"- {label}-{b} KL {ours['kl']:.4f} at {ours['bits_per_weight']:.2f} bits/w vs "
                           f"llama.cpp {quant} {peer['kl']:.4f} at {peer['bits_per_weight']:.2f}: "
                           f"{'met' if met else 'missed'}")
            else:
                out.append(f"- {label}-{b} vs llama.cpp {quant}: not measured")
    eight = vllm.get("mwq-cal-8", {})
    if "bits_per_weight" in eight:
        met = eight["bits_per_weight"] <= 8.5
        out.append(f"- MWQ-8 at {eight['bits_per_weight']:.3f} bits/w (goal <= 8.5, q8_0's): "
                   f"{'met' if met else 'missed'}")
    for prefix, label in calibrated.items():
        for b in WIDTHS:
            ours, alone = vllm.get(f"{prefix}-{b}", {}), vllm.get(f"gptq-{b}", {})
            if "kl" in ours and "kl" in alone:
                ratio = ours["kl"] / alone["kl"]
                out.append(f"- {label}-{b} KL {ours['kl']:.4f} = {ratio:.2f}x the non-nested calibrated "
                           f"{alone['kl']:.4f} (goal <= 1.10x): {'met' if ratio <= 1.1 else 'missed'}")
    return out


if __name__ == "__main__":
    main()
