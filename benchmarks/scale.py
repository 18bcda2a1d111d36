"""Serving at real expert sizes: this project against llama.cpp, all resident and streamed from disk.

On a model directory (a random-weight checkpoint with a real model's shape, from
``d2moe random-model``), one run measures, each engine in its own process (its
peak RSS its own), at 1, 8 and 16 concurrent requests: decode tokens/s, time to
first token (prefill of all the requests), peak RSS split into weights / KV
cache / runtime (the rest), bytes read from disk per generated token, and the
share of decode time compute spent waiting for reads:

* stock vLLM, bfloat16 experts, all resident;
* MWQ all resident at 8 / 4 / 3 / 2 bits (one conversion, 2..8 bits, group 128);
* the learned bit-width router, all resident, when the conversion holds one
  (``d2moe train-router``, or ``--train-router-steps``). Trained on a random model
  the router learns nothing about quality: its row measures speed only;
* the offload pipeline serving 4 bits (hottest-expert-bit-first order, reads
  overlapped with compute, frequent experts kept, ``O_DIRECT`` reads) with a
  budget of 1/2, 1/4 and 1/8 of the MWQ-4 expert bytes;
* the same pipeline at 1/4 with cross-layer prefetch (option ``prefetch``, the
  ``gate`` predictor, depth 1 and 2, and depth 1 with 4 spare experts per
  token): the next layers' experts read while a layer computes;
* beside them llama.cpp (``pip install -e ".[peers]"``; skipped with a message
  when ``llama-cpp-python`` is not installed) at q8_0 / q4_K_M / q2_K, all
  resident (GGUF conversion and engine: ``benchmarks/peers.py``);
* "a device with only B bytes free", for both engines: a helper process takes
  and holds (``mlock``, else touched pages) all available memory but B, never
  leaving less than ``--memory-floor`` to the rest of the machine, and releases it
  when the run ends (Ctrl-C and errors included). This project streams MWQ-4 at
  ``--constrained-budget`` of its expert bytes; llama.cpp q4_K_M runs with its
  default mmap, so whatever of the model does not fit in B is paged from disk.
  B (``--free-memory``) defaults to the peak RSS of this project's unconstrained
  run at that budget plus 15%; the report says whether llama.cpp's model fits
  (then it need not page: vLLM's runtime and 1 GiB KV reservation outweigh a
  4-layer q4_K_M file, so the pair means most on a deeper shape, e.g. all 16 of
  OLMoE's layers with ``--constrained-budget 1/8``, or with an explicit B below
  llama.cpp's file size, where this project's engine may not fit: its failure
  is then reported). A helper the OOM killer took is reported, the pair not judged.

Before the engines, the same run measures the machine's bounds: ``O_DIRECT``
sequential reads of the conversion's expert files (up to ``--disk-probe`` bytes; 1
and 4 threads; the faster is the disk bandwidth) and memory copy bandwidth (numpy copies of 512
MiB). Each streamed run's read rate (bytes read / decode seconds) is reported
as a share of that disk bandwidth, with the tokens/s the disk alone would allow
(disk bandwidth / bytes read per token).

The issue's goals are printed met / missed / not judged: at 8 requests MWQ-4
resident >= 1.0x llama.cpp q4_K_M resident; streamed at 1/4 of the MWQ-4
expert bytes, reads reach >= 70% of the disk bandwidth whenever compute waits
(at least 5% of decode time); streamed MWQ-4 at 1/2 of its expert bytes >= 60%
of its all-resident speed at 8 requests; with the same free memory, >= 2x
llama.cpp paging through mmap (8 requests); with prefetch at 1/4, compute time
waiting on reads cut by >= 50% and decode tokens/s >= 1.3x the same pipeline
without prefetch (each concurrency).

``--engines NAME ...`` runs only the named engines (and no constrained pair).

Writes ``benchmarks/results/NAME.{json,md,png}`` (``--name``, default ``scale``),
rewritten after every engine, and ``NAME.log`` (engine logs). The real run, on
a quiet machine (OLMoE-1B-7B's shape at 4 of its 16 layers: 3.4 GB bf16; Qwen3-30B-A3B's at 4 of
its 48: about 5 GB; with conversions and GGUFs about 25 GB of disk; numbers from a shared machine
mean little)::

    d2moe random-model olmoe-1b-7b /data/olmoe-1b-7b-4l --layers 4
    d2moe random-model qwen3-30b-a3b /data/qwen3-30b-a3b-4l --layers 4
    python benchmarks/scale.py --models /data/olmoe-1b-7b-4l /data/qwen3-30b-a3b-4l

A smoke test of the whole pipeline in a few minutes (fewer engines, requests and
tokens; the numbers mean nothing)::

    d2moe random-model olmoe-1b-7b /tmp/olmoe-1l --layers 1
    python benchmarks/scale.py --models /tmp/olmoe-1l --quick --results-dir /tmp/scale-smoke
"""

import argparse
import ctypes
import json
import math
import mmap
import os
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

from vllm_d2moe.byte_sizes import format_bytes, parse_bytes

import budget_sweep
import peers

RESULTS = budget_sweep.RESULTS
CACHE = Path.home() / ".cache" / "vllm_d2moe" / "scale"
MWQ_WIDTHS = (8, 4, 3, 2)
STREAM_FRACTIONS = ("1/2", "1/4", "1/8")
PREFETCH_FRACTION = "1/4"
PREFETCH_VARIANTS = ((1, 0), (2, 0), (1, 4))  # (depth, spare experts per token) of the gate predictor
PREFETCH_WAIT_CUT, PREFETCH_SPEEDUP = 0.5, 1.3  # the goals against the same budget without prefetch
LLAMA_QUANTS = ("q8_0", "q4_K_M", "q2_K")
WAITING = 0.05  # compute "waits" when it spends at least this share of decode time waiting for reads
QUICK_ENGINES = ("vLLM bf16", "MWQ-4", "MWQ router", "MWQ-4 streamed 1/2", "MWQ-4 streamed 1/4", "llama.cpp q4_K_M")


# ---------------------------------------------------------------- the machine's bounds


def disk_bandwidth(paths: list[Path], probe_bytes: int, threads: int, chunk: int = 8 * 2**20) -> float:
    """Bytes/s of ``O_DIRECT`` reads of up to ``probe_bytes`` of ``paths`` (in order) in ``chunk``-sized
    pieces, ``threads`` reading at once (the page cache bypassed, as the offload pool reads)."""
    fds = [os.open(path, os.O_RDONLY | os.O_DIRECT) for path in paths]
    try:
        pieces = [(fd, offset) for fd, path in zip(fds, paths) for offset in range(0, path.stat().st_size, chunk)]
        pieces = pieces[: -(-probe_bytes // chunk)]

        def read(first: int) -> int:
            buffer = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs; a file's last piece reads short
            done = sum(os.preadv(fd, [buffer], offset) for fd, offset in pieces[first::threads])
            buffer.close()
            return done

        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(read, range(threads)))
        return total / (time.perf_counter() - start)
    finally:
        for fd in fds:
            os.close(fd)


def memory_copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes copied per second by one thread (numpy), the best of ``repeats`` copies of ``nbytes``."""
    import numpy as np

    source, target = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def machine_bounds(mwq_dir: Path, probe_bytes: int) -> dict:
    files = sorted((mwq_dir / "d2moe").glob("*.safetensors"))
    disk = {f"{t} thread{'s' if t > 1 else ''}": disk_bandwidth(files, probe_bytes, t) for t in (1, 4)}
    return {
        "disk_probe_files": f"{mwq_dir / 'd2moe'}/*.safetensors",
        "disk_probe_bytes": min(sum(f.stat().st_size for f in files), probe_bytes),
        "disk_read_bytes_per_s": disk,
        "disk_bandwidth": max(disk.values()),
        "memory_copy_bytes_per_s": memory_copy_bandwidth(),
    }


# ---------------------------------------------------------------- "a device with only B bytes free"


def available_memory() -> int:
    """``MemAvailable``: free memory plus what the kernel can reclaim (page cache) without swapping."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def hold_memory(leave: int, chunk: int = 256 * 2**20) -> None:
    """Helper process: take memory in ``chunk`` pieces until only ``leave`` bytes stay available, lock
    (or at least touch) it, say so on stdout, and hold it until stdin closes (the parent is done or
    died); also killed with the parent."""
    import numpy as np

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the benchmark
    held, locked = [], 0
    while available_memory() - chunk >= leave:
        block = np.ones(chunk, np.uint8)  # written: really resident, not lazily mapped zero pages
        if libc.mlock(ctypes.c_void_p(block.ctypes.data), ctypes.c_size_t(chunk)) == 0:
            locked += chunk
        held.append(block)
    print(f"HELD {len(held) * chunk} {locked} {available_memory()}", flush=True)
    sys.stdin.read()


class MemoryHold:
    """Leave only ``free_bytes`` (at least ``floor``) of the machine's memory available while inside."""

    def __init__(self, free_bytes: int, floor: int):
        self.leave = max(free_bytes, floor)
        self.proc = None

    def __enter__(self) -> "MemoryHold":
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--hold-memory", str(self.leave)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        words = self.proc.stdout.readline().split()
        if not words or words[0] != "HELD":
            self.__exit__(None, None, None)
            raise RuntimeError("the memory-holding helper process failed (see its stderr above)")
        self.held, self.locked, self.available = map(int, words[1:])
        return self

    def __exit__(self, *_) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def describe(self) -> dict:
        """What was held; ``lost``: the helper died before the end (the OOM killer picks the largest
        process), so the engine ran with more memory than B for part of the time."""
        return {
            "held_bytes": self.held,
            "locked_bytes": self.locked,
            "available_bytes": self.available,
            "lost": self.proc.poll() is not None,
        }


def drop_from_page_cache(paths: list[Path]) -> None:
    """Evict these files' cached pages (``POSIX_FADV_DONTNEED``): a constrained run starts cold."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- the engines


def mwq_expert_bytes(mwq_dir: Path, bits: int) -> int:
    """Bytes of every routed expert at width ``bits`` (what MWQ-``bits`` holds resident)."""
    from vllm_d2moe.offload.pool import expert_nbytes

    return sum(e.num_experts * expert_nbytes(e.layout, bits) for e in _layers(mwq_dir))


def streamed(mwq_dir: Path, fraction: str, budget: int, prefetch: dict | None = None) -> dict:
    offload = {**budget_sweep.OFFLOAD_METHODS["+budget"], "direct": True}
    config = {"quant_method": "d2moe", "bits": 4, "memory_budget": budget, "offload": offload}
    name = f"MWQ-4 streamed {fraction}"
    if prefetch:
        config["prefetch"] = prefetch
        name += f" + prefetch {prefetch['predictor']} depth {prefetch['depth']}"
        name += f" extra {prefetch['extra']}" if prefetch.get("extra") else ""
    return peers.vllm_spec(name, mwq_dir, config, budget=budget)


def plan_engines(model_dir: Path, mwq_dir: Path, ggufs: dict, has_router: bool, budgets: dict) -> list[dict]:
    plan = [peers.vllm_spec("vLLM bf16", model_dir, None)]
    plan += [peers.vllm_spec(f"MWQ-{b}", mwq_dir, {"quant_method": "d2moe", "bits": b}) for b in MWQ_WIDTHS]
    if has_router:
        plan.append(peers.vllm_spec("MWQ router", mwq_dir, {"quant_method": "d2moe", "width_policy": "router"}))
    plan += [streamed(mwq_dir, fraction, budget) for fraction, budget in budgets.items()]
    plan += [streamed(mwq_dir, PREFETCH_FRACTION, budgets[PREFETCH_FRACTION],
                      {"predictor": "gate", "depth": d, "extra": m}) for d, m in PREFETCH_VARIANTS]
    plan += [
        {"engine": "llama.cpp", "name": f"llama.cpp {q}", "method": f"llama.cpp {q}", "model": str(ggufs[q])}
        for q in LLAMA_QUANTS
        if q in ggufs
    ]
    return plan


def measure_engine(spec: dict, common: dict, log: Path) -> dict:
    """One engine in its own process (``budget_sweep``'s protocol), with its wall time and the load."""
    script = peers.__file__ if spec["engine"] == "llama.cpp" else budget_sweep.__file__
    load, started = os.getloadavg(), time.perf_counter()
    result = budget_sweep.run_worker(common | spec, log, script=script)
    seconds = time.perf_counter() - started
    if "error" in result:
        print(f"  {spec['name']:32s} {seconds:6.1f} s  FAILED: {budget_sweep.describe_error(result)}", flush=True)
    else:
        rates = " ".join(f"{fmt(decode_rate(r), '.1f') or 'invalid':>8s}" for r in result["rows"])
        print(f"  {spec['name']:32s} {seconds:6.1f} s  tok/s {rates}", flush=True)
    return spec | result | {"seconds": seconds, "load_average_at_start": load, "load_average_at_end": os.getloadavg()}


def train_router(mwq_dir: Path, steps: int, threads: int) -> None:
    """``d2moe train-router`` on the conversion (calibration text: ``budget_sweep``'s prompt sources),
    refused when its dequantized experts (fp32, widths 2/3/4 and the 8-bit teacher) would not fit."""
    params = sum(3 * e.layout.hidden * e.layout.intermediate * e.num_experts for e in _layers(mwq_dir))
    need = params * 4 * 4
    if need > available_memory():
        print(
            f"scale: router not trained: its training model holds about {format_bytes(need)} of dequantized "
            f"experts, {format_bytes(available_memory())} available: the router row is skipped",
            flush=True,
        )
        return
    calib = mwq_dir / "scale-calibration.txt"
    calib.write_text("\n".join((budget_sweep.REPO / s).read_text() for s in budget_sweep.TEXT_SOURCES))
    command = [
        "d2moe",
        "train-router",
        str(mwq_dir),
        "--calib",
        str(calib),
        "--steps",
        str(steps),
        "--batch-size",
        "2",
        "--seq-len",
        "128",
        "--no-progress",
    ]
    print(f"scale: {shlex.join(command)}", flush=True)
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def _layers(mwq_dir: Path):
    from vllm_d2moe.mwq.checkpoint import MWQCheckpoint

    return list(MWQCheckpoint(mwq_dir).layers.values())


def model_shape(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    keys = (
        "architectures",
        "num_hidden_layers",
        "hidden_size",
        "num_experts",
        "num_local_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "intermediate_size",
        "vocab_size",
    )
    return {k: config[k] for k in keys if k in config} | {"random_model": config.get("d2moe_random_model")}


def measure_model(model_dir: Path, args, llama_version: str | None, save) -> dict:
    """Every engine on ``model_dir``; ``save(report)`` after each (a stopped run keeps what it measured)."""
    print(f"scale: {model_dir}", flush=True)
    mwq_dir = budget_sweep.converted(model_dir, args.cache)
    trained_here = args.train_router_steps and not (mwq_dir / "d2moe" / "router.safetensors").is_file()
    if trained_here:
        train_router(mwq_dir, args.train_router_steps, args.threads)
    has_router = (mwq_dir / "d2moe" / "router.safetensors").is_file()
    if not has_router:
        print(f"scale: no learned router in {mwq_dir} (d2moe train-router): router row skipped", flush=True)
    mwq4 = mwq_expert_bytes(mwq_dir, 4)
    budgets = {f: int(mwq4 * Fraction(f)) for f in STREAM_FRACTIONS}
    ggufs, gguf_stats = {}, {}
    wants_llama = not args.engines or any(name.startswith("llama.cpp") for name in args.engines)
    converter = peers.vendored_converter(llama_version, args.cache) if llama_version and wants_llama else None
    if converter:
        ggufs = peers.gguf_files(model_dir, converter, args.cache)
        gguf_stats = {f"llama.cpp {q}": peers.gguf_expert_stats(ggufs[q], converter) for q in LLAMA_QUANTS}
        gguf_stats = {k: v | {"file_bytes": ggufs[k.split()[1]].stat().st_size} for k, v in gguf_stats.items()}
    prompts = budget_sweep.text_prompts(model_dir, max(args.concurrency), args.input_len)
    common = budget_sweep.run_settings(args, prompts)
    log = args.results_dir / f"{args.name}.log"
    runs = {}
    report = {
        "model": str(model_dir),
        "shape": model_shape(model_dir),
        "mwq_checkpoint": str(mwq_dir),
        "router": has_router,
        "router_trained_by_this_run": f"{args.train_router_steps} steps" if has_router and trained_here else None,
        "mwq_expert_bytes": {b: mwq_expert_bytes(mwq_dir, b) for b in MWQ_WIDTHS},
        "stream_budgets": budgets,
        "gguf": gguf_stats,
        "runs": runs,
    }
    plan = plan_engines(model_dir, mwq_dir, ggufs, has_router, budgets)
    if args.quick:
        plan = [spec for spec in plan if spec["name"] in QUICK_ENGINES]
    if args.engines:
        unknown = set(args.engines) - {spec["name"] for spec in plan}
        if unknown:
            raise SystemExit(f"scale: no engine named {sorted(unknown)}; engines: {[spec['name'] for spec in plan]}")
        plan = [spec for spec in plan if spec["name"] in args.engines]
    for spec in plan:
        runs[spec["name"]] = measure_engine(spec, common, log)
        save(report)
    if args.engines:
        report["constrained"] = {"skipped": "--engines chose the engines"}
        return report

    # The same free memory for both engines: this project's streamed run at --constrained-budget.
    ours = streamed(mwq_dir, args.constrained_budget, int(mwq4 * Fraction(args.constrained_budget)))
    measured = runs.get(ours["name"], {}).get("peak_rss_bytes")
    free = args.free_memory or (measured and int(measured * 1.15))
    if not free:
        report["constrained"] = {"skipped": f"no --free-memory and no measured {ours['name']} run to size it"}
        print(f"scale: constrained runs skipped: {report['constrained']['skipped']}", flush=True)
        return report
    report["constrained"] = {"free_memory_bytes": free, "budget": args.constrained_budget, "runs": {}}
    constrained = [ours]
    if "q4_K_M" in ggufs:
        constrained.append(
            {
                "engine": "llama.cpp",
                "name": "llama.cpp q4_K_M",
                "method": "llama.cpp q4_K_M",
                "model": str(ggufs["q4_K_M"]),
            }
        )
    for spec in constrained:
        spec = spec | {"name": f"{spec['name']} @{format_bytes(free)} free"}
        drop_from_page_cache(
            [Path(spec["model"])]
            if spec["engine"] == "llama.cpp"
            else sorted((mwq_dir / "d2moe").glob("*.safetensors"))
        )
        with MemoryHold(free, args.memory_floor) as hold:
            print(
                f"  holding {format_bytes(hold.held)} ({format_bytes(hold.locked)} locked): "
                f"{format_bytes(hold.available)} available",
                flush=True,
            )
            run = measure_engine(spec, common, log) | {"memory_hold": hold.describe()}
        if run["memory_hold"]["lost"]:
            print(f"  {spec['name']}: the memory helper died during the run (OOM killer?): not constrained", flush=True)
        runs[spec["name"]] = run
        report["constrained"]["runs"][spec["engine"]] = spec["name"]
        save(report)
    return report


# ---------------------------------------------------------------- report


def row_io(run: dict, row: dict, output_len: int, disk: float) -> dict | None:
    """Bytes read per generated token, read rate, its share of the disk bandwidth, the share of time
    compute waited (this project), the tokens/s the disk alone would allow; None without reads."""
    c = row["concurrency"]
    if row.get("offload_decode"):  # this project: decode steps only (full minus prefill-only)
        # Demand reads and prefetches alike: every byte the disk gave.
        io = row["offload_decode"] | {"bytes_read": row["offload_decode"]["bytes_read"]
                                      + row["offload_decode"].get("bytes_prefetched", 0)}
        tokens, waited = c * (output_len - 1), io["wait_seconds"] / max(io["seconds"], 1e-9)
    elif row.get("disk_reads"):  # llama.cpp: the whole generation, prompt included
        io = row["disk_reads"]
        tokens, waited = c * output_len, None
    else:
        return None
    rate = io["bytes_read"] / max(io["seconds"], 1e-9)
    per_token = io["bytes_read"] / tokens
    return {
        "bytes_per_token": per_token,
        "read_bytes_per_s": rate,
        "of_disk": rate / disk,
        "waited": waited,
        "disk_bound_tokens_per_s": disk / per_token if per_token else math.inf,
    }


def memory_split(run: dict) -> tuple[float, float, float, float]:
    """Bytes of weights, KV cache, runtime (peak RSS minus both) and peak RSS."""
    memory, rss = run.get("memory", {}), run["peak_rss_bytes"]
    weights, kv = memory.get("weights_bytes", math.nan), memory.get("kv_cache_bytes", math.nan)
    return weights, kv, rss - weights - kv, rss


def decode_rate(row: dict) -> float | None:
    """A row's decode tokens/s; None when its full generation took no longer than its prefill-only one
    (another process disturbed one of the two: the difference measures nothing)."""
    return row["decode_tokens_per_s"] if row["decode_tokens_per_s"] < 1e6 else None


def rate(report: dict, name: str, concurrency: int) -> float | None:
    run = report["runs"].get(name, {})
    return next((decode_rate(r) for r in run.get("rows", []) if r["concurrency"] == concurrency), None)


def goals(report: dict, full: dict) -> list[str]:
    lines = []

    def ratio_goal(label: str, ours: str, theirs: str, target: float, c: int = 8) -> None:
        a, b = rate(report, ours, c), rate(report, theirs, c)
        if a is None or b is None:
            missing = " and ".join(n for n, r in ((ours, a), (theirs, b)) if r is None)
            lines.append(f"{label}: not judged (no valid {c}-request rate of {missing})")
            return
        verdict = "met" if a / b >= target else "missed"
        lines.append(f"{label}: {ours} {a:.1f} tok/s = {a / b:.2f}x {theirs} {b:.1f} (goal >= {target}x): {verdict}")

    ratio_goal("8 requests, all resident", "MWQ-4", "llama.cpp q4_K_M", 1.0)
    name = "MWQ-4 streamed 1/4"
    run = report["runs"].get(name, {})
    if "rows" not in run:
        lines.append(f"{name}: reads vs disk bandwidth not judged (no run)")
    for row in run.get("rows", []):
        io = row_io(run, row, full["output_len"], full["bounds"]["disk_bandwidth"])
        c = row["concurrency"]
        if io is None:
            lines.append(f"{name}, {c} req: not judged (the run reported no offload counters)")
            continue
        if io["waited"] < WAITING:
            lines.append(
                f"{name}, {c} req: compute waited {io['waited']:.0%} of decode time (< {WAITING:.0%}): "
                "met (reads never held compute up)"
            )
            continue
        verdict = "met" if io["of_disk"] >= 0.7 else "missed"
        lines.append(
            f"{name}, {c} req: compute waited {io['waited']:.0%} of decode time while reads ran at "
            f"{io['read_bytes_per_s'] / 1e9:.2f} GB/s = {io['of_disk']:.0%} of the disk's "
            f"{full['bounds']['disk_bandwidth'] / 1e9:.2f} GB/s (goal >= 70%): {verdict}"
        )
    ratio_goal("streamed 1/2 vs resident, 8 requests", "MWQ-4 streamed 1/2", "MWQ-4", 0.6)
    lines += prefetch_goals(report)
    constrained = report.get("constrained", {}).get("runs", {})
    if "vllm" in constrained and "llama.cpp" in constrained:
        lost = [n for n in constrained.values() if report["runs"][n].get("memory_hold", {}).get("lost")]
        if lost:
            lines.append(f"same free memory: not judged (the memory helper died during {', '.join(lost)})")
        else:
            ratio_goal("same free memory, 8 requests", constrained["vllm"], constrained["llama.cpp"], 2.0)
        gguf = report["gguf"].get("llama.cpp q4_K_M", {})
        free = report["constrained"]["free_memory_bytes"]
        if gguf.get("file_bytes", 0) <= free:
            lines.append(
                f"note: llama.cpp q4_K_M's file ({format_bytes(gguf.get('file_bytes', 0))}) fits in the "
                f"{format_bytes(free)} free: it need not page (see its bytes read per token)"
            )
    else:
        lines.append(
            "same free memory: not judged ("
            + (report.get("constrained", {}).get("skipped") or "no llama.cpp q4_K_M constrained run")
            + ")"
        )
    return lines


def prefetch_goals(report: dict) -> list[str]:
    """Per prefetch row and concurrency: compute time waiting on reads (decode steps) cut by at least
    ``PREFETCH_WAIT_CUT`` and decode tokens/s at least ``PREFETCH_SPEEDUP``x the same budget without."""
    base_name = f"MWQ-4 streamed {PREFETCH_FRACTION}"
    base = {r["concurrency"]: r for r in report["runs"].get(base_name, {}).get("rows", [])}
    lines = []
    for name, run in report["runs"].items():
        if "prefetch" not in name or "@" in name:
            continue
        if "rows" not in run:
            lines.append(f"{name}: not judged (the engine failed: {budget_sweep.describe_error(run)})")
            continue
        for row in run["rows"]:
            c, other = row["concurrency"], base.get(row["concurrency"])
            ours, theirs = decode_rate(row), other and decode_rate(other)
            if not (ours and theirs and row.get("offload_decode") and other.get("offload_decode")):
                lines.append(f"{name}, {c} req: not judged (no valid {base_name} row or rate to compare)")
                continue
            wait, wait_before = row["offload_decode"]["wait_seconds"], other["offload_decode"]["wait_seconds"]
            cut = 1 - wait / wait_before if wait_before > 0 else math.nan
            lines.append(
                f"{name}, {c} req: compute waited {wait:.2f} s against {wait_before:.2f} s without prefetch "
                f"(cut {cut:.0%}, goal >= {PREFETCH_WAIT_CUT:.0%}: {'met' if cut >= PREFETCH_WAIT_CUT else 'missed'}); "
                f"{ours:.1f} tok/s = {ours / theirs:.2f}x {theirs:.1f} (goal >= {PREFETCH_SPEEDUP}x: "
                f"{'met' if ours / theirs >= PREFETCH_SPEEDUP else 'missed'})"
            )
    return lines


def prefetch_section(report: dict) -> list[str]:
    """What prefetch read and how well it predicted (decode steps, from the offload counters)."""
    rows = []
    for name, run in report["runs"].items():
        compared = "prefetch" in name or name == f"MWQ-4 streamed {PREFETCH_FRACTION}"
        for row in run.get("rows", []) if compared else []:
            io = row.get("offload_decode") or {}
            demand, prefetched = io.get("bytes_read", 0), io.get("bytes_prefetched", 0)
            rows.append(
                f"| {name} | {row['concurrency']} | {format_bytes(demand)} | {format_bytes(prefetched)} "
                f"| {format_bytes(io.get('bytes_wasted', 0))} | {io.get('prefetch_hits', 0)} | {io.get('misses', 0)} "
                f"| {fmt(io.get('wait_seconds'), '.2f')} |"
            )
    if not rows:
        return []
    out = [
        "Prefetch (decode steps): demand bytes read, bytes prefetched, of them unused by the call they were "
        "read for, experts a call found prefetched, demand reads left, seconds compute waited on reads.",
        "",
        "| engine | req | demand bytes | prefetched | unused | prefetch hits | demand reads | waited s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    recall = []
    for name, run in report["runs"].items():
        depths = ((run.get("offload") or {}).get("prefetch") or {}).get("depths", {})
        for depth, c in depths.items():
            if c.get("recall") is not None:
                recall.append(f"| {name} | {depth} | {c['recall']:.1%} | {c['precision']:.1%} | {c['calls']} |")
    if recall:
        out += [
            "Forecasts over the whole run (warm-up and prefill included): recall = (expert, width) pairs "
            "a layer call computed that were forecast; precision = forecast experts it used.",
            "",
            "| engine | depth | recall | precision | layer calls |",
            "|---|---:|---:|---:|---:|",
            *recall,
            "",
        ]
    return out


def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value / scale, spec)


def start_reads(run: dict) -> str:
    """Expert bytes the offload pool read while the engine started (blank: not offloaded, or not measured)."""
    at_start = run.get("offload_at_start")
    return format_bytes(at_start.get("bytes_read", 0)) if at_start else ""


def model_section(report: dict, full: dict) -> list[str]:
    concurrency, disk = full["concurrency"], full["bounds"]["disk_bandwidth"]
    shape = report["shape"]
    random_note = shape.get("random_model") or {}
    out = [
        f"## `{report['model']}`",
        "",
        f"Shape: {json.dumps({k: v for k, v in shape.items() if k != 'random_model'})}"
        + (f"; {random_note.get('note', '')} (shape of {random_note.get('shape_of')})" if random_note else ""),
        "",
        "MWQ expert bytes: "
        + ", ".join(f"{b} bits {format_bytes(n)}" for b, n in report["mwq_expert_bytes"].items())
        + "; streamed budgets (of MWQ-4's): "
        + ", ".join(f"{f} = {format_bytes(b)}" for f, b in report["stream_budgets"].items())
        + (
            "; llama.cpp files: "
            + ", ".join(f"{k.split()[1]} {format_bytes(v['file_bytes'])}" for k, v in report["gguf"].items())
            if report["gguf"]
            else ""
        ),
        "",
    ]
    if report["router"]:
        trained = report.get("router_trained_by_this_run")
        origin = f"trained by this run, {trained}" if trained else "found in the conversion"
        speed_only = ": on random weights it learns nothing about quality; the row measures serving speed"
        out += [
            f"The router row serves the conversion's learned router ({origin}){speed_only if random_note else '.'}",
            "",
        ]
    if "free_memory_bytes" in report.get("constrained", {}):
        out += [
            f"Rows marked '@B free' ran while a helper process held all memory but B "
            f"({format_bytes(report['constrained']['free_memory_bytes'])}); what it held and what "
            "stayed available is in the JSON.",
            "",
        ]
    columns = [
        "engine",
        *(f"tok/s {c} req" for c in concurrency),
        *(f"first token ms {c} req" for c in concurrency),
        "weights MiB",
        "KV MiB",
        "runtime MiB",
        "peak RSS MiB",
        "start s",
        "RSS at start MiB",
        "expert bytes read at start",
    ]
    out += ["| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
    for name, run in report["runs"].items():
        if "rows" not in run:
            error = " ".join(run.get("error", "").split())[:200].replace("|", "/")
            out.append(f"| {name} | error: {error} |")
            continue
        weights, kv, runtime, rss = memory_split(run)
        out.append(
            "| "
            + " | ".join(
                [
                    name,
                    *(fmt(decode_rate(r), ".1f") or "invalid" for r in run["rows"]),
                    *(fmt(r["first_token_seconds"] * 1000, ".0f") for r in run["rows"]),
                    *(fmt(x, ".0f", 2**20) for x in (weights, kv, runtime, rss)),
                    fmt(run.get("start_seconds"), ".1f"),
                    fmt(run.get("rss_after_start_bytes"), ".0f", 2**20),
                    start_reads(run),
                ]
            )
            + " |"
        )
    out += [
        "",
        "Reads (this project: decode steps, the offload counters of the full generation minus those "
        "of the prefill-only one, so noise can make a small share negative; llama.cpp: whole generations, "
        "from /proc/self/io). An invalid rate: the full generation took no longer than the prefill-only "
        "one (disturbed).",
        "",
        "| engine | req | bytes read / token | read GB/s | of disk bandwidth | compute waited | "
        "disk-bound tok/s | tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in report["runs"].items():
        for row in run.get("rows", []):
            io = row_io(run, row, full["output_len"], disk)
            if io is None or (io["bytes_per_token"] == 0 and "streamed" not in name and "free" not in name):
                continue
            out.append(
                "| "
                + " | ".join(
                    [
                        name,
                        str(row["concurrency"]),
                        format_bytes(io["bytes_per_token"]),
                        fmt(io["read_bytes_per_s"], ".3f", 1e9),
                        f"{io['of_disk']:.0%}",
                        "" if io["waited"] is None else f"{io['waited']:.0%}",
                        fmt(io["disk_bound_tokens_per_s"], ".1f"),
                        fmt(decode_rate(row), ".1f") or "invalid",
                    ]
                )
                + " |"
            )
    out += ["", *prefetch_section(report)]
    out += [*(f"- {line}" for line in report.get("goals", [])), ""]
    return out


def markdown(full: dict) -> str:
    bounds = full["bounds"]
    out = [
        f"# Serving at scale ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `{full['command']}`",
        "",
        f"Machine: {full['machine']}; {full['threads']} threads per engine; {full['input_len']} prompt tokens, "
        f"{full['output_len']} generated (greedy, EOS ignored); fastest of {full['repeats']} repeats; load "
        f"average at start {'/'.join(f'{x:.2f}' for x in full['load_average_at_start'])}"
        + (
            f", at end {'/'.join(f'{x:.2f}' for x in full['load_average_at_end'])}"
            if "load_average_at_end" in full
            else ""
        )
        + ".",
        "",
        f"Measured in this run: disk {bounds['disk_bandwidth'] / 1e9:.2f} GB/s (O_DIRECT sequential reads of "
        f"{format_bytes(bounds['disk_probe_bytes'])} of the expert files; "
        + ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in bounds["disk_read_bytes_per_s"].items())
        + f"); memory copy {bounds['memory_copy_bytes_per_s'] / 1e9:.2f} GB/s (one thread).",
        "",
    ]
    for report in full.get("models", []):
        out += model_section(report, full)
    return "\n".join(out)


def plot(full: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = full.get("models", [])
    fig, axes = plt.subplots(2, max(len(models), 1), figsize=(7 * max(len(models), 1), 9), squeeze=False)
    disk = full["bounds"]["disk_bandwidth"]
    for column, report in enumerate(models):
        peers.throughput_panel(
            axes[0][column],
            report["runs"],
            full["concurrency"],
            f"{Path(report['model']).name}: decode throughput",
            dotted="streamed",
            crossed="free",
            rate=lambda row: decode_rate(row) or math.nan,
        )
        ax = axes[1][column]
        bars = [
            (f"{name}\n{row['concurrency']} req", io["of_disk"])
            for name, run in report["runs"].items()
            for row in run.get("rows", [])
            if (io := row_io(run, row, full["output_len"], disk)) and io["bytes_per_token"] > 0
        ]
        if bars:
            ax.bar(range(len(bars)), [100 * b for _, b in bars])
            ax.set_xticks(range(len(bars)), [label for label, _ in bars], rotation=90, fontsize=6)
        ax.axhline(70, color="red", linewidth=0.8, linestyle=":")
        ax.set(title=f"reads / disk bandwidth ({disk / 1e9:.2f} GB/s); red: the 70% goal", ylabel="%")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", type=Path, help="Hugging Face model directories (bf16)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="conversions (MWQ 2..8 g128, GGUF)")
    budget_sweep.add_run_arguments(parser, concurrency=[1, 8, 16], threads=2, repeats=2)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: " + ", ".join(QUICK_ENGINES) + " and the constrained pair; 1 and 8 "
        "requests, 32 prompt and 16 generated tokens, one repeat (unless given)",
    )
    parser.add_argument(
        "--constrained-budget",
        default="1/4",
        choices=STREAM_FRACTIONS,
        help="this project's budget (of the MWQ-4 expert bytes) in the constrained runs",
    )
    parser.add_argument(
        "--free-memory",
        type=lambda v: parse_bytes(v, "--free-memory"),
        help="B of the constrained runs, e.g. 4GiB (default: this project's run at "
        "--constrained-budget, peak RSS + 15%%)",
    )
    parser.add_argument(
        "--memory-floor",
        type=lambda v: parse_bytes(v, "--memory-floor"),
        default=2 * 2**30,
        help="the memory helper never leaves less than this available (default 2GiB)",
    )
    parser.add_argument(
        "--disk-probe",
        type=lambda v: parse_bytes(v, "--disk-probe"),
        default=2**30,
        help="bytes read to measure the disk bandwidth (default 1GiB)",
    )
    parser.add_argument(
        "--train-router-steps",
        type=int,
        default=0,
        help="train a router on the conversion when it has none (d2moe train-router --steps N)",
    )
    parser.add_argument("--engines", nargs="+", help="run only these engines (names as in the report), "
                        "without the constrained pair")
    parser.add_argument("--name", default="scale")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--render", action="store_true", help="rewrite NAME.md and NAME.png from NAME.json")
    parser.add_argument("--hold-memory", type=int, help=argparse.SUPPRESS)  # the MemoryHold helper
    if "--quick" in sys.argv:
        parser.set_defaults(concurrency=[1, 8], input_len=32, output_len=16, repeats=1)
    args = parser.parse_args()
    if args.hold_memory is not None:
        hold_memory(args.hold_memory)
        return
    paths = {ext: args.results_dir / f"{args.name}.{ext}" for ext in ("json", "md", "png")}
    if args.render:
        full = json.loads(paths["json"].read_text())
        for report in full.get("models", []):
            report["goals"] = goals(report, full)
        paths["json"].write_text(json.dumps(full, indent=1))
        paths["md"].write_text(markdown(full))
        plot(full, paths["png"])
        return
    if not args.models:
        parser.error("--models is required")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.name}.log").write_text("")
    llama_version = peers.llama_cpp_version()
    full = budget_sweep.run_header(args, __file__) | {"llama_cpp_python": llama_version or "not installed"}
    done = []

    def save(report: dict) -> None:  # rewritten after each engine: a stopped run keeps what it measured
        report["goals"] = goals(report, full)
        full["models"] = [*done, report]
        full["load_average_at_end"] = os.getloadavg()
        paths["json"].write_text(json.dumps(full, indent=1))
        paths["md"].write_text(markdown(full))
        plot(full, paths["png"])

    for model_dir in args.models:
        mwq_dir = budget_sweep.converted(model_dir, args.cache)
        if "bounds" not in full:  # measured once, on the first model's expert files
            full["bounds"] = machine_bounds(mwq_dir, args.disk_probe)
            print(
                f"scale: disk {full['bounds']['disk_bandwidth'] / 1e9:.2f} GB/s, memory copy "
                f"{full['bounds']['memory_copy_bytes_per_s'] / 1e9:.2f} GB/s",
                flush=True,
            )
        report = measure_model(model_dir, args, llama_version, save)
        save(report)
        done.append(report)
    print(markdown(full))


if __name__ == "__main__":
    main()
