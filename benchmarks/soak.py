"""Soak: ``d2moe serve`` of the embedded model streaming its experts under a memory budget, hours-style
concurrent OpenAI load, faults injected while it runs, every answer checked (issue 17).

Loopback only; bounded by ``--minutes`` (and ``--max-requests``); stops by itself. The run itself
is :func:`vllm_d2moe.testing.soak.soak_run` (its docstring says what is sent, injected and
checked): the embedded reference model converted as ``d2moe demo`` converts it (once, into
``--workdir``), expected answers from an all-resident server sent each request alone (cached under
``--workdir``), then ``--clients`` concurrent clients against a server of a copy of it at
``--budget`` with ``O_DIRECT`` reads and ``on_read_error: "fail"`` (a damaged expert must fail
its requests, not answer them narrower: every answer is compared bit for bit). ``--router DIR``
serves it with a learned bit-width router and per-request targets (``vllm_xargs``), capacities
off (per-batch capacities would make an answer depend on its batch), damage on the router's
widest plane; ``DIR`` is a copy of that conversion with ``d2moe train-router`` run on it.

Writes ``benchmarks/results/soak[-router].json`` and ``.png`` (RSS and latency over time), and
``soak.md`` from every soak JSON there; prints the table. Exit status 1 when a goal is missed.

    python benchmarks/soak.py --minutes 30 --clients 64 [--router DIR]
"""

import argparse
import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
RSS_GOAL_PCT_PER_HOUR, RSS_GOAL_MIN_MINUTES = 1.0, 20
RUNS = {"soak": "streaming budget, fixed width", "soak-router": "streaming budget, router, per-request targets"}


def pristine_checkpoint(workdir: Path, router_dir: Path | None) -> Path:
    """The embedded model converted as the demo converts it, in ``workdir`` (converted once; by the
    code that serves it); with ``router_dir``, that directory, checked to be a copy of the same
    conversion holding a trained router."""
    import shutil

    import vllm_d2moe
    from vllm_d2moe.demo import converted_checkpoint
    from vllm_d2moe.mwq.checkpoint import CheckpointError
    from vllm_d2moe.mwq.quantize import MWQSpec
    from vllm_d2moe.router.model import RouterSet

    embedded = Path(vllm_d2moe.__file__).parent / "assets" / "reference-small"
    try:
        converted = converted_checkpoint(embedded, workdir, MWQSpec(2, 8, 128))
    except CheckpointError as e:  # made by an older format version: converted again
        print(f"converting again: {e}", flush=True)
        shutil.rmtree(workdir / f"{embedded.name}-d2moe-w2-8-g128")
        converted = converted_checkpoint(embedded, workdir, MWQSpec(2, 8, 128))
    if router_dir is None:
        return converted
    index = Path("d2moe") / "index.json"
    if (router_dir / index).read_text() != (converted / index).read_text():
        raise SystemExit(f"--router {router_dir}: its {index} differs from {converted / index} (another conversion)")
    RouterSet.load(router_dir)  # raises with the reason when there is none
    return router_dir


def run(args) -> dict | None:
    from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
    from vllm_d2moe.testing.soak import cached_expected_outcomes, soak_requests, soak_run

    name = "soak-router" if args.router else "soak"
    workdir = args.workdir / name
    pristine = pristine_checkpoint(args.workdir, args.router)
    spec = MWQCheckpoint(pristine).spec
    options = {"memory_budget": args.budget, "offload": {"direct": True}, "on_read_error": "fail"}
    if args.router:
        from vllm_d2moe.router.model import RouterSet

        top = max(RouterSet.load(pristine).widths)
        options["capacities"] = "off"
    else:
        top = spec.max_bits
    server_args = ("--dtype", "float32", "--gpu-memory-utilization", "0.3",
                   *(("--enforce-eager",) if args.enforce_eager else ()))
    targets = tuple(args.targets) if args.router else ()
    reference_cache = workdir.parent / f"{name}-expected.json"
    if args.expected_only:
        workdir.mkdir(parents=True, exist_ok=True)
        cached_expected_outcomes(pristine, workdir, options, (*server_args, "--max-model-len", str(args.max_model_len)),
                                 soak_requests(args.max_model_len, targets), reference_cache, print)
        return None
    started = time.time()
    result = soak_run(pristine, workdir, quantization_config=options, server_args=server_args,
                      clients=args.clients, duration_s=args.minutes * 60, max_model_len=args.max_model_len,
                      section=top - spec.min_bits, targets=targets, reference_cache=reference_cache,
                      max_requests=args.max_requests, seed=args.seed, end_by_unix=args.end_by)
    report = {"name": name, "description": RUNS[name], "started_unix": started, "model": str(pristine),
              "asked_minutes": args.minutes, **result.to_json()}
    growth = report["summary"]["rss"].get("growth_pct_per_hour")
    # The memory goal; a slope over a shorter run says little about an hour.
    long_enough = result.config["duration_s"] >= RSS_GOAL_MIN_MINUTES * 60
    if long_enough and growth is not None and growth >= RSS_GOAL_PCT_PER_HOUR:
        report["summary"]["violations"].append(f"RSS growth {growth:+.2f}%/h after warm-up "
                                               f"(goal under {RSS_GOAL_PCT_PER_HOUR}%/h)")
    return report


def table(report: dict) -> str:
    s = report["summary"]
    outcomes = s["outcomes"]
    latency, rss, anon = s["latency_s"], s["rss"], s.get("anon", {})

    def seconds(x):
        return "-" if x is None else f"{x:.2f} s"

    growth = rss.get("growth_pct_per_hour")
    anon_growth = anon.get("growth_pct_per_hour")
    lines = [
        f"### {report['name']}: {report['description']}",
        "",
        f"{report['config']['clients']} clients for {report['config']['duration_s'] / 60:.1f} min "
        f"(asked for {report['asked_minutes']:g}; last answer at {report['config']['wall_s'] / 60:.1f} min), "
        f"options `{json.dumps(report['config']['quantization_config'])}`"
        + (f", targets {report['config']['targets']}" if report["config"]["targets"] else ""),
        "",
        "| requests | ok | failed by injected faults | abandoned by the client | wrong | unexplained failures | lost "
        "| p50 latency | p99 latency | RSS growth after warm-up | anonymous memory growth after warm-up "
        "| pool bounded | alive and healthy at the end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['requests']} | {outcomes.get('ok', 0)} | {outcomes.get('failed_by_fault', 0)} "
        f"| {outcomes.get('abandoned', 0)} | {outcomes.get('wrong', 0)} | {outcomes.get('unexplained', 0)} "
        f"| {outcomes.get('lost', 0)} | {seconds(latency['p50'])} | {seconds(latency['p99'])} "
        f"| {'-' if growth is None else f'{growth:+.2f}%/h'} "
        f"| {'-' if anon_growth is None else f'{anon_growth:+.2f}%/h'} | {'yes' if s['pool_bounded'] else 'NO'} "
        f"| {'yes' if s['alive_at_end'] and s['healthy_at_end'] else 'NO'} |",
        "",
        "| fault | applied at | requests failed naming its expert |",
        "|---|---|---|",
    ]
    for event in report["faults"]:
        if event["action"] == "apply":
            failed = s["failures_by_fault"].get(event["name"], 0)
            lines.append(f"| {event['name']} | {event['t_s'] / 60:.1f} min | {failed} |")
        else:
            lines.append(f"| (ended) {event['name']} | {event['t_s'] / 60:.1f} min | |")
    lines += ["", "| request kind | " + " | ".join(sorted(outcomes)) + " |", "|---" * (len(outcomes) + 1) + "|"]
    for kind, counts in s["by_kind"].items():
        lines.append(f"| {kind} | " + " | ".join(str(counts.get(o, 0)) for o in sorted(outcomes)) + " |")
    if rss.get("growth_pct_per_hour") is not None:
        lines += ["", f"RSS of the server's process tree: {rss['first_bytes'] / 2**20:.0f} MiB at "
                      f"{rss['from_s'] / 60:.1f} min (end of warm-up), {rss['last_bytes'] / 2**20:.0f} MiB at the end, "
                      f"max {rss['max_bytes'] / 2**20:.0f} MiB; least-squares slope over {rss['samples']} samples. "
                      f"Pool bytes max: occupied {s['pool_max']['pool_occupied']}, allocated "
                      f"{s['pool_max']['pool_allocated']}, budget {s['pool_max']['pool_budget']}. "
                      f"Tracebacks in the server log: {report['config']['server_log_tracebacks']}."]
    if anon_growth is not None:
        lines += ["", f"Anonymous memory (RssAnon: the heaps; RSS also counts file pages mapped as first touched): "
                      f"{anon['first_bytes'] / 2**20:.0f} MiB at the end of warm-up, {anon['last_bytes'] / 2**20:.0f} "
                      f"MiB at the end. Per process after warm-up: " + "; ".join(
                          f"{name} {g['first_bytes'] / 2**20:.0f} -> {g['last_bytes'] / 2**20:.0f} MiB "
                          f"({g['growth_pct_per_hour']:+.2f}%/h)" for name, g in per_process_growth(report).items())
                  + "."]
    if s["violations"]:
        lines += ["", "**Goals missed:** " + "; ".join(s["violations"])]
    return "\n".join(lines)


def per_process_growth(report: dict) -> dict:
    """Anonymous-memory growth after warm-up of each process of the server's tree."""
    from vllm_d2moe.testing.soak import rss_growth

    warm = [s for s in report["samples"] if s["t_s"] >= 0.25 * report["config"]["duration_s"]]
    names = sorted({name for s in warm for name in s.get("anon_by_process", {})})
    growth = {name: rss_growth([{"t_s": s["t_s"], "anon": s["anon_by_process"].get(name)} for s in warm], "anon")
              for name in names}
    return {name: g for name, g in growth.items() if g["growth_pct_per_hour"] is not None}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rss_ax, lat_ax) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    samples = report["samples"]
    rss_ax.plot([s["t_s"] / 60 for s in samples], [s["rss_bytes"] / 2**20 for s in samples], label="RSS (process tree)")
    if any("anon_bytes" in s for s in samples):
        rss_ax.plot([s["t_s"] / 60 for s in samples], [s.get("anon_bytes", 0) / 2**20 for s in samples],
                    label="anonymous (process tree)")
    rss_ax.set_ylabel("MiB (not from 0)")
    for outcome, color in (("ok", "tab:blue"), ("failed_by_fault", "tab:orange"), ("wrong", "red"),
                           ("unexplained", "purple"), ("lost", "black")):
        points = [(r["end_s"] / 60, r["end_s"] - r["start_s"]) for r in report["records"] if r["outcome"] == outcome]
        if points:
            lat_ax.scatter(*zip(*points), s=2, color=color, label=outcome)
    for event in report["faults"]:
        for ax in (rss_ax, lat_ax):
            ax.axvline(event["t_s"] / 60, color="grey", linewidth=0.6, linestyle=":")
    lat_ax.set_ylabel("latency (s)")
    lat_ax.set_xlabel("minutes (dotted: faults applied or ended)")
    lat_ax.legend(fontsize=7, markerscale=4)
    rss_ax.legend(fontsize=7)
    fig.suptitle(f"{report['name']}: {report['config']['clients']} clients; RSS and request latency over time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def compact(report: dict) -> dict:
    """The report with per-minute counts and latencies instead of one record per request (tens of
    thousands); the records of answers that were wrong, unexplained or lost are kept whole."""
    from vllm_d2moe.testing.soak import percentiles

    minutes = {}
    for r in report["records"]:
        minutes.setdefault(int(r["end_s"] // 60), []).append(r)
    timeline = []
    for minute, records in sorted(minutes.items()):
        latencies = sorted(r["end_s"] - r["start_s"] for r in records if r["outcome"] in ("ok", "failed_by_fault"))
        counts = {}
        for r in records:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        timeline.append({"minute": minute, **counts, "latency_s": percentiles(latencies)})
    bad = [r for r in report["records"] if r["outcome"] in ("wrong", "unexplained", "lost")]
    return {**{k: v for k, v in report.items() if k != "records"}, "timeline": timeline, "bad_records": bad}


def write_markdown(results: Path) -> str:
    parts = ["# Soak: concurrent OpenAI clients, streamed experts, injected faults",
             "", "Written by `benchmarks/soak.py` (what it sends, injects and checks: its docstring and "
             "`vllm_d2moe/testing/soak.py`). Every greedy answer is compared with the same request sent alone "
             "to an all-resident server: *wrong*, *unexplained* (a failure naming no faulted expert) and *lost* "
             "(no answer) must be 0. Plots: `soak*.png`.", ""]
    for name in RUNS:
        path = results / f"{name}.json"
        if path.exists():
            parts += [table(json.loads(path.read_text())), ""]
    text = "\n".join(parts)
    (results / "soak.md").write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-requests", type=int, default=None, help="stop after this many requests")
    parser.add_argument("--end-by", type=float, default=None, metavar="UNIX_TIME",
                        help="shorten the clients' run so that it ends by then (reported as run)")
    parser.add_argument("--budget", default="4MiB", help="expert memory budget (default 4MiB: streaming)")
    parser.add_argument("--router", type=Path, default=None, metavar="DIR",
                        help="serve with a bit-width router and per-request targets: DIR is a copy of the "
                        "conversion in --workdir with `d2moe train-router` run on it")
    parser.add_argument("--targets", type=float, nargs="+", default=[2.0, 3.0, 4.0],
                        help="per-request target widths with --router (default 2 3 4)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM eager mode (default: compiled)")
    parser.add_argument("--workdir", type=Path, default=None, help="the conversion, copies, logs, cached "
                        "expected answers (default: <cache>/soak)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write (default benchmarks/results)")
    parser.add_argument("--no-write", action="store_true", help="print, write nothing under --results")
    parser.add_argument("--expected-only", action="store_true",
                        help="only compute (and cache under --workdir) the expected answers, then stop")
    args = parser.parse_args()
    if args.workdir is None:
        from vllm_d2moe.reference.corpus import cache_root

        args.workdir = cache_root() / "soak"
    try:
        report = run(args)
    except Exception as e:  # noqa: BLE001 (the exception that stopped the run, then a non-zero exit)
        import traceback

        traceback.print_exc()
        print(f"soak stopped: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if report is None:
        return 0
    print(table(report))
    if not args.no_write:
        args.results.mkdir(exist_ok=True)
        plot(report, args.results / f"{report['name']}.png")
        (args.results / f"{report['name']}.json").write_text(json.dumps(compact(report), indent=1))
        write_markdown(args.results)
    return 1 if report["summary"]["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
