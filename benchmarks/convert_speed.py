"""`d2moe convert` speed and memory: the previous float64 converter against the current one, in one run.

Converts the same checkpoint (by default a random OLMoE-1B-7B truncated to 2 layers,
written with ``d2moe random-model`` under --scratch) with:

* ``old``: the converter as it was before float32 quantization (``converters/convert.py``
  at commit OLD_CONVERTER, loaded from git: float64 quantization, one thread of Python
  with torch's intra-op threads, safetensors reads);
* ``float64 (new pipeline)``: today's converter with ``--reference-float64 --workers 1``;
* ``float32, 1 worker``: today's converter, one worker with torch's intra-op threads
  (on a loaded machine torch's OpenMP threads mostly wait on each other: slow);
* ``float32``: today's converter with its defaults (one single-threaded worker per core).

Each run is a fresh process with the source dropped from the page cache first; the
parent samples its anonymous and file-backed RSS. All outputs must be byte-identical
(checked). Prints a table and writes benchmarks/results/convert_speed.{md,json}.

    python benchmarks/convert_speed.py [--model DIR] [--layers 2] [--scratch /work/scratch]
"""

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors import safe_open

from vllm_d2moe.converters.convert import _numel, plan_conversion
from vllm_d2moe.converters.memory_watch import PeakMemory
from vllm_d2moe.converters.random_model import write_random_model
from vllm_d2moe.mwq.checkpoint import EXPERTS_DIR

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
# The parent of the commit that replaced float64 quantization in converters/convert.py.
OLD_CONVERTER = "e63c080^"
OLD_RUNNER = """
import importlib.util, sys
import vllm_d2moe.mwq
from vllm_d2moe.mwq.quantize import MWQSpec

def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

# The old converter with the checkpoint writer of its own commit.
load("vllm_d2moe.mwq.checkpoint", sys.argv[1])
old = load("old_convert", sys.argv[2])
old.convert(sys.argv[3], sys.argv[4], MWQSpec(), progress=False)
"""


def drop_from_page_cache(model: Path) -> None:
    for path in model.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_one(name: str, command: list[str], model: Path, dst: Path, expert_params: int) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    drop_from_page_cache(model)
    load_before = load_average()
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Reading smaps_rollup walks the page tables of the mapped source: sample gently.
    with PeakMemory(proc.pid, interval=0.5) as peak:
        out, err = proc.communicate()
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{err[-3000:]}")
    cpu = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
    digest = hashlib.sha256()  # over the expert blobs by name: files may order them differently
    for path in sorted((dst / EXPERTS_DIR).glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in sorted(f.keys()):
                digest.update(key.encode() + f.get_tensor(key).numpy().tobytes())
    row = {
        "run": name,
        "command": " ".join(command),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "mparams_per_s": round(expert_params / wall / 1e6, 1),
        "mparams_per_cpu_s": round(expert_params / cpu / 1e6, 1),
        "peak_anonymous_mib": peak.anonymous >> 20,
        "peak_file_backed_mib": peak.file_backed >> 20,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "experts_sha256": digest.hexdigest()[:16],
    }
    print(
        f"{name:<28} {row['wall_s']:>7.1f} s  {row['mparams_per_s']:>6.1f} M/s  "
        f"{row['mparams_per_cpu_s']:>6.1f} M/CPU-s  anon {row['peak_anonymous_mib']:>6} MiB  "
        f"file {row['peak_file_backed_mib']:>6} MiB  load {load_before}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="HF checkpoint (default: generate olmoe-1b-7b)")
    parser.add_argument("--layers", type=int, default=2, help="layers of the generated model")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--skip", nargs="*", default=[], help="run names to leave out (e.g. old)")
    parser.add_argument("--keep", action="store_true", help="keep the generated model and outputs")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="convert_speed-", dir=args.scratch))
    model = args.model
    try:
        if model is None:
            model = write_random_model(
                "olmoe-1b-7b", work / "hf", layers=args.layers, progress=False
            )
        plan = plan_conversion(model)
        expert_params = sum(
            _numel(p) for experts in plan.experts.layers.values() for e in experts for p in e.parts
        )
        source_bytes = sum(t.nbytes for t in plan.experts.expert_tensors.values())
        layer_bytes = source_bytes // len(plan.experts.layers)
        commit = git("rev-parse", "--short", OLD_CONVERTER).strip()
        old_source, old_checkpoint = work / "old_convert.py", work / "old_checkpoint.py"
        old_source.write_text(git("show", f"{commit}:converters/convert.py"))
        old_checkpoint.write_text(git("show", f"{commit}:vllm_d2moe/mwq/checkpoint.py"))
        cli = [sys.executable, "-m", "vllm_d2moe.cli", "convert", str(model)]
        runs = {
            f"old (float64, {commit})": [
                *(
                    sys.executable,
                    "-c",
                    OLD_RUNNER,
                    str(old_checkpoint),
                    str(old_source),
                    str(model),
                )
            ],
            "float64 (new pipeline)": [*cli, "--reference-float64", "--workers", "1"],
            "float32, 1 worker": [*cli, "--workers", "1"],
            "float32": cli,
        }
        print(
            f"{model}: {len(plan.experts.layers)} MoE layers, {expert_params / 1e6:.0f}M expert "
            f"parameters ({source_bytes / 1e9:.2f} GB bf16, {layer_bytes / 1e9:.2f} GB per layer); "
            f"{os.cpu_count()} CPUs",
            flush=True,
        )
        rows = []
        for name, command in runs.items():
            if any(name.startswith(s) for s in args.skip):
                continue
            dst = work / "out"
            rows.append(run_one(name, [*command, str(dst)], model, dst, expert_params))
        identical = len({r["experts_sha256"] for r in rows}) == 1
        print(f"outputs byte-identical: {identical}")
        report = {
            "model": str(model),
            "generated": args.model is None,
            "layers": len(plan.experts.layers),
            "expert_params": expert_params,
            "expert_source_bytes": source_bytes,
            "layer_source_bytes": layer_bytes,
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "outputs_identical": identical,
            "runs": rows,
        }
        write_results(report)
        if not identical:
            sys.exit("outputs differ")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def write_results(report: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "convert_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# `d2moe convert` speed",
        "",
        "Source: "
        f"{'a random OLMoE-1B-7B (`d2moe random-model olmoe-1b-7b`)' if report['generated'] else report['model']}, "
        f"{report['layers']} MoE layers, {report['expert_params'] / 1e6:.0f}M expert parameters "
        f"({report['expert_source_bytes'] / 1e9:.2f} GB bf16; "
        f"one layer {report['layer_source_bytes'] / 1e9:.2f} GB). "
        f"{report['cpus']} CPUs. Each run is a fresh process with the source dropped from the page cache; "
        "RSS sampled every 0.5 s. Written by `python benchmarks/convert_speed.py`.",
        "",
        "| run | wall s | M params/s | M params/CPU-s | peak anon MiB | peak file-backed MiB "
        "| load avg before (1/5/15 min) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['run']} | {r['wall_s']} | {r['mparams_per_s']} | {r['mparams_per_cpu_s']} | "
            f"{r['peak_anonymous_mib']} | {r['peak_file_backed_mib']} | {r['load_average_before']} |"
        )
    lines += ["", f"Expert files byte-identical across runs: {report['outputs_identical']}.", ""]
    (RESULTS / "convert_speed.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
