"""Load ramp: time per output token and average width while concurrent requests ramp 1 -> 32 -> 1,
with the online SLO controller on, off, and at fixed widths.

Each configuration serves the same closed-loop load: ``LEVELS`` concurrent
requests in turn, each level held ``--hold`` seconds and until it counted
``MIN_TOKENS_PER_REQUEST`` tokens per request (at most ``MAX_HOLDS`` holds: at
high load a step can outlast a hold); a finished request is
replaced at once while its level lasts (random prompt tokens, ``--max-tokens``
generated, EOS ignored). Configurations (one engine each, in this process one
after another: the engine core runs here, so the width counts and the
controller are read directly):

* ``fixed:2``, ``fixed:3``, ``fixed:4``: every pair at that width;
* ``router``: the learned router at its fixed calibrated shift (controller off);
* ``router+slo``: the router steered online by ``slo: {"tpot_ms": T}``.

T is ``--tpot-ms``, or else the p90 time per output token of ``fixed:3`` at 8
concurrent requests (so the SLO binds in the middle of the ramp: widest widths
meet it at low load, none at the top).

Time per output token: the time between consecutive tokens of one request (a
step with a newcomer's prefill counts for those waiting on it). Per level: p90
of those that arrive after its first ``SETTLE_SHARE`` hold (requests from the
level before drain meanwhile); average width: pairs counted in the same stretch.
Goals printed met / missed: at every level where some fixed width's p90 meets
T, ``router+slo``'s p90 meets T and its average width is within 0.25 of the
widest fixed width meeting it.

Model: the OLMoE-1B-7B expert shape (hidden 2048, 64 experts of intermediate
1024, top-8) truncated to one decoder layer, random weights (``d2moe random-model``),
MWQ 2..4 bits. Its router is seeded random, not trained (as the test suite's
routed models): ``d2moe train-router`` on this one layer was killed by the OOM
killer at 10.8 GB resident (it holds every expert dequantized in float32 at each
width, with the teacher) on this shared 23 GB machine, and trained on a random
model a router learns nothing about quality anyway: here it only has to be a
router of the real shape, for speed. Its target-bits calibration is measured
exactly as ``train-router`` measures it (average width over
``CALIBRATION_SHIFTS``), on the MoE layer's inputs of calibration text through
the bf16 model: with one decoder layer those inputs precede every quantized
expert, so they are the served ones. ``--prepare`` makes it all (cached under
``~/.cache/vllm_d2moe/load_ramp``) and exits.

Writes ``benchmarks/results/load_ramp.{json,md,png}``; configurations already in
the JSON are kept unless run again (``--configs`` runs a subset).
"""

import argparse
import gc
import json
import os
import random
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CACHE = Path.home() / ".cache" / "vllm_d2moe" / "load_ramp"
LEVELS = (1, 2, 4, 8, 16, 32, 16, 8, 4, 2, 1)
SETTLE_SHARE = 0.4
MIN_TOKENS_PER_REQUEST = 3
MAX_HOLDS = 4
CONFIGS = {
    "fixed:2": {"width_policy": "fixed:2"},
    "fixed:3": {"width_policy": "fixed:3"},
    "fixed:4": {"width_policy": "fixed:4"},
    "router": {"width_policy": "router"},
    "router+slo": {"width_policy": "router"},  # slo added at run time
}
FIXED = ("fixed:2", "fixed:3", "fixed:4")
AUTO_SLO = ("fixed:3", 8)  # the SLO defaults to this configuration's p90 at this level


def prepare(workdir: Path) -> Path:
    """The 1-layer OLMoE-shape conversion with a seeded router (made once, cached)."""
    hf, ckpt = workdir / "olmoe-1b-7b-1l", workdir / "olmoe-1b-7b-1l-d2moe"
    commands = []
    if not (hf / "config.json").is_file():
        commands.append(["d2moe", "random-model", "olmoe-1b-7b", str(hf), "--layers", "1", "--overwrite"])
    if not (ckpt / "d2moe" / "index.json").is_file():
        commands.append(["d2moe", "convert", str(hf), str(ckpt), "--min-bits", "2", "--max-bits", "4",
                         "--overwrite"])
    for command in commands:
        print(f"load_ramp: {shlex.join(command)}", flush=True)
        subprocess.run(command, check=True)
    if not (ckpt / "d2moe" / "router.safetensors").is_file():
        write_seeded_router(hf, ckpt)
    return ckpt


def write_seeded_router(hf: Path, ckpt: Path, widths=(2, 3, 4), capacities=(0.3, 0.4, 0.3)) -> None:
    """A seeded random router for the one MoE layer, calibrated on the layer's inputs (see the docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_d2moe.router.model import RouterSet, WidthRouter
    from vllm_d2moe.router.train import CALIBRATION_SHIFTS, calibration_tokens

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16).eval()
    experts = [m for name, m in model.named_modules() if name.endswith("mlp.experts")]
    assert len(experts) == 1, f"{hf}: expected one MoE layer, found {len(experts)}"
    captured = []
    experts[0].register_forward_hook(lambda module, inputs, output: captured.append(inputs))
    config = model.config
    generator = torch.Generator().manual_seed(0)
    router = WidthRouter(config.num_experts, config.hidden_size, len(widths)).requires_grad_(False)
    for p in router.parameters():
        p.copy_(torch.randn(p.shape, generator=generator))
    router.weight.mul_(4.0 / config.hidden_size**0.5)  # hidden-state products of the bias's size
    calib = ckpt / "calibration.txt"
    calib.write_text("\n".join(p.read_text() for p in sorted((REPO / "vllm_d2moe").glob("**/*.py"))))
    tokens = torch.from_numpy(np.asarray(calibration_tokens(ckpt, str(calib), 40_000)[: 32 * 128])).long()
    with torch.no_grad():
        for window in tokens.view(-1, 128).split(4):
            model(input_ids=window)
        scores = torch.cat([torch.log_softmax(router(x.float(), w.float(), ids), -1).reshape(-1, len(widths))
                            for x, ids, w in captured])
    bits = torch.tensor(widths, dtype=torch.float32)
    table, lowest = [], float("inf")
    for shift in CALIBRATION_SHIFTS:  # train.calibrate's curve, on these scores
        lowest = min(lowest, float(bits[(scores - float(shift) * bits).argmax(1)].mean()))
        table.append((float(shift), lowest))
    RouterSet(widths, "expert", {0: router}, capacities, tuple(table),
              {"note": "seeded random, not trained (benchmarks/load_ramp.py)"}).save(ckpt)
    print(f"load_ramp: seeded router written, calibrated on {scores.shape[0]} pairs: average "
          f"{table[0][1]:.2f} .. {table[-1][1]:.2f} bits", flush=True)


def _width_totals() -> np.ndarray:
    from vllm_d2moe.width_selection import WIDTH_STATS

    totals = np.zeros(9)
    for histogram in WIDTH_STATS.snapshot().values():
        for bits, pairs in histogram.items():
            totals[bits] += pairs
    return totals


def run_config(name: str, checkpoint: Path, options: dict, args) -> dict:
    """Serve the ramp with one configuration; per-token intervals and per-step width counts."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core here: its counts are ours
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    from vllm_d2moe.vllm_glue.llm import ENGINE_ENV, start_llm
    from vllm_d2moe.vllm_glue.metrics import process_stats
    from vllm_d2moe.vllm_glue.width_control import active_controller

    os.environ.update(ENGINE_ENV)
    started = time.monotonic()
    llm = start_llm(str(checkpoint), hf_overrides={"quantization_config": {"quant_method": "d2moe", **options}},
                    enforce_eager=True, dtype="bfloat16", max_model_len=args.prompt_tokens + args.max_tokens + 8,
                    max_num_seqs=max(LEVELS), distributed_executor_backend="uni")
    start_seconds = time.monotonic() - started
    engine = llm.llm_engine
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0.0,
                            output_kind=RequestOutputKind.DELTA)
    serial = 0

    def add_request():
        nonlocal serial
        serial += 1
        prompt = TokensPrompt(prompt_token_ids=[rng.randrange(3, 8000) for _ in range(args.prompt_tokens)])
        engine.add_request(f"r{serial}", prompt, params)
        return f"r{serial}"

    try:
        # Warm-up (first-call costs), then the counts restart.
        for _ in range(4):
            add_request()
        while engine.has_unfinished_requests():
            engine.step()
        process_stats(reset=True)
        intervals, steps, running, last_token, bounds = [], [], set(), {}, []
        t0 = time.monotonic()
        for level_index, level in enumerate(LEVELS):
            start = time.monotonic() - t0
            counted_from = start + SETTLE_SHARE * args.hold
            while not _level_done(intervals, level_index, level, start, counted_from, time.monotonic() - t0,
                                  args.hold):
                while len(running) < level:
                    running.add(add_request())
                outputs = engine.step()
                now = time.monotonic()
                for out in outputs:
                    if out.outputs and out.outputs[0].token_ids:
                        if out.request_id in last_token:
                            intervals.append((now - t0, level_index, now - last_token[out.request_id]))
                        last_token[out.request_id] = now
                    if out.finished:
                        running.discard(out.request_id)
                        last_token.pop(out.request_id, None)
                controller = active_controller()
                snapshot = controller.snapshot() if controller is not None else {}
                steps.append((now - t0, level_index, len(running), *_width_totals().tolist(),
                              snapshot.get("setpoint_bits"), snapshot.get("shift")))
            bounds.append((counted_from, time.monotonic() - t0))
        for request_id in list(running):
            engine.abort_request([request_id])
        return {"intervals": intervals, "steps": steps, "bounds": bounds, "start_seconds": round(start_seconds, 1),
                "options": options, "controller": process_stats()["controller"]}
    finally:
        engine.engine_core.shutdown()
        del llm
        gc.collect()


def time_bins(result: dict, width: float = 1.0) -> list[dict]:
    """What the plot shows, per ``width`` seconds: p90 time per output token, average width, the
    most concurrent requests and the controller's last setpoint (the JSON keeps these, not every token)."""
    intervals = np.array(result["intervals"]) if result["intervals"] else np.zeros((0, 3))
    steps = np.array([[np.nan if v is None else v for v in s] for s in result["steps"]], dtype=float)
    bins = []
    for lo in np.arange(0.0, steps[-1, 0], width):
        waits = intervals[(intervals[:, 0] >= lo) & (intervals[:, 0] < lo + width), 2]
        inside = steps[(steps[:, 0] >= lo) & (steps[:, 0] < lo + width)]
        counted = inside[-1, 3:12] - inside[0, 3:12] if len(inside) >= 2 else np.zeros(9)
        bins.append({
            "t": float(lo + width / 2),
            "p90_tpot_ms": float(np.percentile(waits, 90) * 1e3) if len(waits) else None,
            "average_bits": float((counted * np.arange(9)).sum() / counted.sum()) if counted.sum() else None,
            "requests": int(inside[:, 2].max()) if len(inside) else 0,
            "setpoint_bits": None if not len(inside) or np.isnan(inside[-1, 12]) else float(inside[-1, 12]),
        })
    return bins


def _level_done(intervals: list, index: int, level: int, start: float, counted_from: float, now: float,
                hold: float) -> bool:
    """A level lasts ``hold`` seconds and until ``MIN_TOKENS_PER_REQUEST`` tokens a request were
    counted after its settling time (slow steps at high load), at most ``MAX_HOLDS`` holds."""
    if now < start + hold:
        return False
    counted = sum(1 for t, i, _ in reversed(intervals[-4 * MIN_TOKENS_PER_REQUEST * level:])
                  if i == index and t >= counted_from)
    return counted >= MIN_TOKENS_PER_REQUEST * level or now >= start + MAX_HOLDS * hold


def level_summary(result: dict) -> list[dict]:
    """Per level: p90 / median time per output token and average width after the settling time."""
    intervals = np.array(result["intervals"]) if result["intervals"] else np.zeros((0, 3))
    steps = np.array([s[:12] for s in result["steps"]], dtype=float)
    rows = []
    for index, level in enumerate(LEVELS):
        begin, end = result["bounds"][index]
        waits = intervals[(intervals[:, 0] >= begin) & (intervals[:, 0] < end), 2] * 1e3
        inside = steps[(steps[:, 0] >= begin) & (steps[:, 0] < end)]
        bits = None
        if len(inside) >= 2:
            counted = inside[-1, 3:12] - inside[0, 3:12]
            bits = float((counted * np.arange(9)).sum() / counted.sum()) if counted.sum() else None
        rows.append({
            "level": level,
            "p90_tpot_ms": float(np.percentile(waits, 90)) if len(waits) else None,
            "median_tpot_ms": float(np.median(waits)) if len(waits) else None,
            "tokens": int(len(waits)),
            "average_bits": bits,
        })
    return rows


def judge(report: dict) -> list[dict]:
    """The goals per level: the SLO met where a fixed width meets it, within 0.25 bits of the best."""
    tpot = report["tpot_ms"]
    configs = report["configs"]
    if "router+slo" not in configs or not all(c in configs for c in FIXED):
        return []
    goals = []
    for index, level in enumerate(LEVELS):
        meeting = [(int(c.split(":")[1]), configs[c]["levels"][index]) for c in FIXED
                   if (configs[c]["levels"][index]["p90_tpot_ms"] or np.inf) <= tpot]
        slo = configs["router+slo"]["levels"][index]
        row = {"index": index, "level": level, "slo_p90_ms": slo["p90_tpot_ms"], "slo_bits": slo["average_bits"],
               "best_fixed_meeting": max(b for b, _ in meeting) if meeting else None}
        if meeting:
            row["p90_met"] = slo["p90_tpot_ms"] is not None and slo["p90_tpot_ms"] <= tpot
            row["bits_met"] = (slo["average_bits"] is not None
                               and slo["average_bits"] >= row["best_fixed_meeting"] - 0.25)
        goals.append(row)
    return goals


def fmt(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    configs = report["configs"]
    names = [n for n in CONFIGS if n in configs]
    lines = [
        "# Load ramp: time per output token and average width, 1 -> 32 -> 1 concurrent requests",
        "",
        f"Model: {report['model']}. {report['note']}",
        f"Each level held {report['hold_s']} s, {report['prompt_tokens']} prompt tokens, "
        f"{report['max_tokens']} generated per request; per level what follows its first "
        f"{SETTLE_SHARE * report['hold_s']:.1f} s counts (a level lasts until {MIN_TOKENS_PER_REQUEST} tokens a "
        f"request were counted, at most {MAX_HOLDS} holds). "
        f"SLO: tpot_ms = {report['tpot_ms']:.1f} ({report['tpot_origin']}). Machine: {report['machine']}.",
        "",
        "p90 time per output token (ms) / average width (bits) per level:",
        "",
        "| level | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for index, level in enumerate(LEVELS):
        cells = []
        for n in names:
            row = configs[n]["levels"][index]
            cells.append(f"{fmt(row['p90_tpot_ms'])} / {fmt(row['average_bits'], '.2f')}")
        lines.append(f"| {level} | " + " | ".join(cells) + " |")
    lines += ["", "Engine start-up (s): " + ", ".join(f"{n} {configs[n]['start_seconds']}" for n in names), ""]
    goals = report["goals"]
    if goals:
        lines += ["Goals (router+slo against the fixed widths, per level):", "",
                  "| level | best fixed width meeting the SLO | router+slo p90 ms | p90 within SLO | "
                  "router+slo bits | within 0.25 bits |", "|---|---|---|---|---|---|"]
        for g in goals:
            met = {True: "met", False: "MISSED", None: "not judged (no width meets it)"}
            lines.append(f"| {g['level']} | {fmt(g['best_fixed_meeting'], 'd')} | {fmt(g['slo_p90_ms'])} | "
                         f"{met[g.get('p90_met')]} | {fmt(g['slo_bits'], '.2f')} | {met[g.get('bits_met')]} |")
        judged = [g for g in goals if "p90_met" in g]
        lines += ["", f"p90 within the SLO at {sum(g['p90_met'] for g in judged)}/{len(judged)} judged levels; "
                  f"average width within 0.25 bits of the best fixed width at "
                  f"{sum(g['bits_met'] for g in judged)}/{len(judged)}.", ""]
    else:
        lines += ["Goals not judged: the fixed widths and router+slo must all have run.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b, ax_l) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for name, result in report["configs"].items():
        bins = result["bins"]
        centres = [b["t"] for b in bins]
        ax_t.plot(centres, [np.nan if b["p90_tpot_ms"] is None else b["p90_tpot_ms"] for b in bins], label=name)
        ax_b.plot(centres, [np.nan if b["average_bits"] is None else b["average_bits"] for b in bins], label=name)
        if name == "router+slo":
            ax_l.plot(centres, [b["requests"] for b in bins], color="grey")
    ax_t.axhline(report["tpot_ms"], color="black", linestyle="--", label="SLO")
    ax_t.set_ylabel("p90 time per output token (ms, 1 s bins)")
    ax_t.set_yscale("log")
    ax_t.legend(fontsize=8)
    ax_b.set_ylabel("average width (bits)")
    ax_l.set_ylabel("concurrent requests")
    ax_l.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="d2moe checkpoint with a router "
                        "(default: the cached 1-layer OLMoE-shape one, made with --prepare)")
    parser.add_argument("--prepare", action="store_true", help="make the default checkpoint if missing, and exit")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS),
                        help="configurations to run (none: rewrite the report from the JSON)")
    parser.add_argument("--tpot-ms", type=float, default=None)
    parser.add_argument("--hold", type=float, default=12.0, help="seconds per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--name", default="load_ramp")
    parser.add_argument("--note", default="", help="said in the report (e.g. the machine's load)")
    args = parser.parse_args()
    if args.prepare:
        print(f"load_ramp: ready: {prepare(CACHE)}", flush=True)
        return 0
    checkpoint = args.checkpoint or CACHE / "olmoe-1b-7b-1l-d2moe"
    out = RESULTS / f"{args.name}.json"
    report = json.loads(out.read_text()) if out.is_file() else {}
    settings = {"model": str(checkpoint), "hold_s": args.hold, "max_tokens": args.max_tokens,
                "prompt_tokens": args.prompt_tokens}
    if report and any(report.get(k) != v for k, v in settings.items()):
        print(f"load_ramp: {out} was made with other settings; starting it afresh", flush=True)
        report = {}
    report = {"configs": {}, **report, **settings}
    report["note"] = args.note or report.get("note", "")
    if args.configs or "machine" not in report:
        report["machine"] = f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}"
    for name in args.configs:
        options = dict(CONFIGS[name])
        if name == "router+slo":
            tpot, origin = args.tpot_ms, "--tpot-ms"
            if tpot is None:
                source, level = AUTO_SLO
                if source not in report["configs"]:
                    print(f"load_ramp: router+slo needs --tpot-ms or a {source} run first", flush=True)
                    continue
                tpot = report["configs"][source]["levels"][LEVELS.index(level)]["p90_tpot_ms"]
                origin = f"{source}'s p90 at {level} concurrent requests"
                if tpot is None:
                    print(f"load_ramp: {source} has no p90 at {level} requests: give --tpot-ms", flush=True)
                    continue
            report["tpot_ms"], report["tpot_origin"] = tpot, origin
            options["slo"] = {"tpot_ms": tpot}
        print(f"load_ramp: {name} {options}", flush=True)
        try:
            result = run_config(name, checkpoint, options, args)
        except Exception:  # the exception that stopped the engine, then the other configurations
            traceback.print_exc()
            continue
        result["levels"] = level_summary(result)
        result["bins"] = time_bins(result)
        del result["intervals"], result["steps"]
        report["configs"][name] = result
        print("  " + "  ".join(f"{r['level']}:{fmt(r['p90_tpot_ms'])}ms/{fmt(r['average_bits'], '.2f')}b"
                               for r in result["levels"]), flush=True)
        out.write_text(json.dumps(report))
    if "tpot_ms" not in report:
        source, level = AUTO_SLO
        if source in report["configs"]:
            report["tpot_ms"] = report["configs"][source]["levels"][LEVELS.index(level)]["p90_tpot_ms"]
            report["tpot_origin"] = f"{source}'s p90 at {level} concurrent requests"
        else:
            report["tpot_ms"], report["tpot_origin"] = args.tpot_ms or float("nan"), "--tpot-ms"
    report["goals"] = judge(report)
    out.write_text(json.dumps(report))
    text = markdown(report)
    (RESULTS / f"{args.name}.md").write_text(text)
    plot(report, RESULTS / f"{args.name}.png")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
