"""Decode throughput under expert memory budgets: the offload pipeline against its baselines.

One run serves the same model through vLLM (CPU, eager unless ``--compiled``, bfloat16 activations)
with every method below, each engine in its own process (so its peak RSS is
its own), at 1 / 4 / 8 / 16 concurrent requests of ``--input-len`` prompt
tokens and ``--output-len`` generated tokens (greedy, EOS ignored):

* ``bf16``: stock vLLM, unquantized bfloat16 experts, all resident;
* ``int8-resident``: MWQ at 8 bits, all resident ("hold-in-memory INT8");
* ``mwq4-resident``: MWQ at 4 bits, all resident (issue 4's end-to-end check);
* ``mwq2-resident``, ``mwq3-resident``: the narrower widths, all resident; ``mwq4-dense-int8``,
  ``mwq4-dense-int4``, ``mwq8-dense-int8``: with the non-expert linear layers (attention, output
  head) as weight-only int8 / int4 too (``dense`` option); ``mwq2/4/8-dense-w8a8``: those layers as
  int8 with per-token int8 activations (vLLM's oneDNN GEMM); ``mwq4-int8-kernel`` (and ``-dense-int4``):
  the experts through the int8-activation kernel (``D2MOE_KERNEL=cpu_int8``); all resident, opt-in;
* offloaded under each budget, reads with ``O_DIRECT`` (page cache bypassed),
  the paper's ablation steps:

  - ``matryoshka-free``: on demand, expert-id order, reads on the compute
    thread, every width a separate full copy, nothing kept across calls;
  - ``on-demand`` (+MWQ reuse): the same with upgrades reading only new planes;
  - ``+hebf``: hottest-expert-bit-first order, reads on background threads
    overlapped with compute;
  - ``+budget`` (the full pipeline): also keeps the most frequent experts
    resident across calls;
  - ``router+budget`` (with ``--router DIR``): the full pipeline serving the
    learned bit-width router's widths (D²MoE as a whole: slots sized for the
    router's widest width, upgrades read only new planes). ``DIR`` is a copy of
    the same conversion with ``d2moe train-router`` run on it.

Engines run with ``--threads`` torch threads (default 1; the I/O threads of
the pipeline are extra). Budgets run from one layer's experts (at the serving width) to all of them.
Decode tokens/s is ``c * (output_len - 1) / (t(output_len) - t(1))``: the time
of the full generation minus that of the fastest prefill-only (one token) generation of
the same prompts; of ``--repeats`` measurements the fastest (least disturbed by
the other jobs on a shared machine) is reported, the median kept in the JSON.
Prompts are windows of real Python/English text (the model's training domain),
so routing follows the trained router.

``--cpu-setups`` runs every engine once per CPU set-up (see :func:`cpu_setup_env`): the allocator
and OpenMP runtime preloaded, threads pinned or not (``benchmarks/results/cpu_setup.md``).

Writes ``benchmarks/results/budget_sweep.json``, ``budget_sweep.png`` (tokens/s
against budget per method, one panel per concurrency) and prints a table.

    python benchmarks/budget_sweep.py [--model DIR] [--concurrency 1 4 8 16] [--output-len 128]
"""

import argparse
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

from vllm_d2moe.cpu_setup import found_libraries, share_reserved_cpus
from vllm_d2moe.vllm_glue.llm import ENGINE_ENV as BASE_ENGINE_ENV

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "vllm_d2moe" / "assets" / "reference-small"
ENGINE_ENV = {
    **BASE_ENGINE_ENV,
    # The engine core stays in the benchmark's worker process (not vLLM's default spawned
    # ones): the thread count it sets and the peak RSS it reads (getrusage) are the engine's.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # vLLM logs to stdout, which carries the worker's result; a failing model worker's traceback (logged, not
    # raised) belongs in the log, with the other processes' tracebacks.
    "VLLM_LOGGING_STREAM": "ext://sys.stderr",
}
OFFLOAD_METHODS = {
    "matryoshka-free": {"order": "id", "overlap": False, "reuse": False, "keep": False},
    "on-demand": {"order": "id", "overlap": False, "reuse": True, "keep": False},
    "+hebf": {"order": "hebf", "overlap": True, "reuse": True, "keep": False},
    "+budget": {"order": "hebf", "overlap": True, "reuse": True, "keep": True},
}
# All-resident MWQ runs at a fixed width (quantization_config, environment): widths 4, 2, 3, the non-expert layers
# as weight-only int8 / int4 or W8A8 (the ``dense`` option), the int8-activation expert kernel (D2MOE_KERNEL).
RESIDENT_VARIANTS = {
    "mwq4-resident": ({"bits": 4}, {}),  # issue 4's end-to-end check: MWQ width 4 against bf16
    "mwq2-resident": ({"bits": 2}, {}),
    "mwq3-resident": ({"bits": 3}, {}),
    "mwq4-dense-int8": ({"bits": 4, "dense": "int8"}, {}),
    "mwq4-dense-int4": ({"bits": 4, "dense": "int4"}, {}),
    "mwq8-dense-int8": ({"bits": 8, "dense": "int8"}, {}),
    "mwq2-dense-w8a8": ({"bits": 2, "dense": "w8a8"}, {}),
    "mwq4-dense-w8a8": ({"bits": 4, "dense": "w8a8"}, {}),
    "mwq8-dense-w8a8": ({"bits": 8, "dense": "w8a8"}, {}),
    "mwq4-int8-kernel": ({"bits": 4}, {"D2MOE_KERNEL": "cpu_int8"}),
    "mwq4-int8-kernel-dense-int4": ({"bits": 4, "dense": "int4"}, {"D2MOE_KERNEL": "cpu_int8"}),
}
WORKER_TIMEOUT_S = 3600
# --cpu-setups parts that preload a library -> the name vLLM looks for in LD_PRELOAD (vllm_d2moe.cpu_setup)
PRELOAD_PARTS = {"tcmalloc": "libtcmalloc", "iomp": "libiomp"}
# --cpu-setups parts that run the engine in vLLM's default process layout (see cpu_setup_env)
LAYOUT_PARTS = ("mp", "mp-allcpus", "mp-d2moe")
TEXT_SOURCES = ["README.md", "vllm_d2moe/experts.py", "vllm_d2moe/offload/pipeline.py", "vllm_d2moe/mwq/layout.py"]


# ---------------------------------------------------------------- one engine (worker process)

def run_engine(spec: dict) -> dict:
    import psutil
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_d2moe.offload import metrics_snapshots
    from vllm_d2moe.vllm_glue.llm import start_llm

    started = time.perf_counter()
    llm = start_llm(
        spec["model"],
        hf_overrides={"quantization_config": spec["quantization_config"]} if spec["quantization_config"] else None,
        dtype="bfloat16",
        enforce_eager=not spec.get("compiled", False),  # set by this sweep's --compiled only
        max_model_len=spec["input_len"] + spec["output_len"] + 8,
        max_num_seqs=max(spec["concurrency"]),
    )
    # Start-up as a user meets it (the engine runs in this process): its time, the memory it holds
    # before any request, and what the offload pool read to start (vLLM's profiling pass included).
    start = {
        "start_seconds": time.perf_counter() - started,
        "rss_after_start_bytes": psutil.Process().memory_info().rss,
        "offload_at_start": offload_totals(llm) or None,
    }
    torch.set_num_threads(spec["threads"])
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]

    def timed(n: int, tokens: int) -> tuple[float, dict]:
        """Seconds of one generation and the offload counters it added (empty when nothing is offloaded)."""
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        before = offload_totals(llm)
        start = time.perf_counter()
        outputs = llm.generate(prompts[:n], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == tokens for o in outputs)
        return elapsed, {k: v - before[k] for k, v in offload_totals(llm).items()}

    timed(2, 8)  # warm-up (first-call set-up; fills a pool like steady serving)
    rows = []
    for c in spec["concurrency"]:
        fulls, prefills, decode_io = [], [], []
        for _ in range(spec["repeats"]):
            prefill, prefill_io = timed(c, 1)
            full, full_io = timed(c, spec["output_len"])
            prefills.append(prefill)
            fulls.append(full)
            # The decode part's reads and waits: the full generation's minus the prefill-only one's.
            decode_io.append({k: v - prefill_io[k] for k, v in full_io.items()} | {"seconds": full - prefill})
        # Each full generation less the least disturbed prefill-only one (the same work every repeat): a
        # prefill slowed by another job would otherwise make its repeat's decode look arbitrarily fast.
        rates = [c * (spec["output_len"] - 1) / (full - min(prefills)) for full in fulls]
        fastest = max(range(len(rates)), key=rates.__getitem__)
        rows.append({
            "concurrency": c,
            "decode_tokens_per_s": rates[fastest],  # the least disturbed repeat (shared machine)
            "median_decode_tokens_per_s": statistics.median(rates),
            "all_decode_tokens_per_s": rates,
            # Until every one of the c requests has its first token (prefill of all c prompts).
            "first_token_seconds": min(prefills),
            "offload_decode": decode_io[fastest] if len(decode_io[fastest]) > 1 else None,
        })
    snapshots = metrics_snapshots()
    return {
        **start,
        # What the process runs on, as mapped (LD_PRELOAD of a missing file is only a loader warning).
        "libraries_loaded": sorted({Path(line.split()[-1]).name
                                    for line in Path("/proc/self/maps").read_text().splitlines()
                                    if any(name in line for name in ("tcmalloc", "libiomp", "libgomp"))}),
        "rows": rows,
        "offload": snapshots[0] if snapshots else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "memory": engine_memory(llm),
        # The model workers as they ran (another process under an ``mp`` set-up: its threads, CPUs, peak RSS).
        "workers": llm.collective_rpc(_worker_process),
    }


def _worker_process(worker) -> dict:
    import torch

    return {"pid": os.getpid(), "torch_threads": torch.get_num_threads(), "cpus": sorted(os.sched_getaffinity(0)),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _worker_offload_totals(worker) -> dict:
    from vllm_d2moe.offload import metrics_snapshots

    totals: dict = {}
    for snapshot in metrics_snapshots():
        for name, value in snapshot["total"].items():
            totals[name] = totals.get(name, 0) + value
    return totals


def offload_totals(llm) -> dict:
    """The offload counters (reads, bytes read, seconds waited, ...) summed over the engine's workers
    and their offload managers; empty without offloading. A worker RPC (a function: in another
    process only with ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``, which the ``mp`` set-ups set)."""
    totals: dict = {}
    for worker in llm.collective_rpc(_worker_offload_totals):
        for name, value in worker.items():
            totals[name] = totals.get(name, 0) + value
    return totals


def _worker_memory(worker) -> dict:
    """Bytes of the model's weights (routed experts included, and also counted alone) and of its
    KV cache tensors, in the worker ``worker``."""
    model = worker.model_runner.model
    experts = weights = 0
    for module in model.modules():
        held = getattr(getattr(module, "quant_method", None), "experts", None)
        if hasattr(held, "nbytes"):  # d2moe: packed experts (or its offload pool) outside the parameters
            experts += held.nbytes
            weights += held.nbytes
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            nbytes = tensor.numel() * tensor.element_size()
            weights += nbytes
            if name in ("w13_weight", "w2_weight"):  # vLLM's unquantized routed experts
                experts += nbytes
    kv_tensors = {t.data_ptr(): t for entry in worker.model_runner.kv_caches
                  for t in (entry if isinstance(entry, (list, tuple)) else [entry])}
    kv = sum(t.numel() * t.element_size() for t in kv_tensors.values())
    return {"weights_bytes": weights, "expert_bytes": experts, "kv_cache_bytes": kv}


def engine_memory(llm) -> dict:
    """:func:`_worker_memory` of the (single) worker: needs the engine in this process or a worker RPC."""
    try:
        return llm.collective_rpc(_worker_memory)[0]
    except Exception as e:  # memory split is a report extra: never lose the throughput run for it
        return {"error": f"{type(e).__name__}: {e}"}


# ---------------------------------------------------------------- the sweep (launching process)

def text_prompts(model_dir: Path, count: int, length: int) -> list[list[int]]:
    """``count`` windows of ``length`` token ids of real text, tokenized by the model's tokenizer."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = [i for source in TEXT_SOURCES for i in tokenizer.encode((REPO / source).read_text()).ids]
    if len(ids) < count * length:
        raise SystemExit(f"not enough text for {count} prompts of {length} tokens")
    return [ids[k * length : (k + 1) * length] for k in range(count)]


def converted(model_dir: Path, cache: Path) -> Path:
    import shutil

    from vllm_d2moe.converters.convert import convert
    from vllm_d2moe.mwq.checkpoint import MWQCheckpoint, OutdatedFormatError
    from vllm_d2moe.mwq.quantize import MWQSpec

    dst = cache / f"{model_dir.name}-d2moe"
    if (dst / "d2moe" / "index.json").is_file():
        try:
            MWQCheckpoint(dst)
        except OutdatedFormatError as e:  # the sweep's own cache: convert again
            print(f"{e}; converting again", flush=True)
            shutil.rmtree(dst)
    if not (dst / "d2moe" / "index.json").is_file():
        convert(model_dir, dst, MWQSpec(2, 8, 128))
    return dst


def routed_copy(router_dir: Path, d2moe: Path) -> Path:
    """``router_dir``, checked to hold a trained router over the very experts of ``d2moe``."""
    from vllm_d2moe.router.model import RouterSet

    index = "d2moe/index.json"
    if json.loads((router_dir / index).read_text()) != json.loads((d2moe / index).read_text()):
        raise SystemExit(f"--router {router_dir}: its {index} differs from {d2moe / index} (another conversion)")
    routers = RouterSet.load(router_dir)  # raises with the reason when there is none
    print(f"router: {router_dir}, widths {routers.widths}, capacities {routers.capacities}", flush=True)
    return router_dir


def budgets(checkpoint, bits: int) -> dict[str, int]:
    """From one layer's experts to all of them, with one third of the bf16 expert bytes between."""
    from vllm_d2moe.offload.pool import expert_nbytes

    layers = list(checkpoint.layers.values())
    slot = expert_nbytes(layers[0].layout, bits)
    experts = sum(entry.num_experts for entry in layers)
    bf16 = experts * 3 * layers[0].layout.hidden * layers[0].layout.intermediate * 2
    margin = 4096  # the kernel layout's per-tensor slack
    return {
        "one layer": layers[0].num_experts * slot + margin,
        "1/3 bf16": bf16 // 3,
        "everything": experts * slot + margin,
    }


def add_run_arguments(parser, concurrency: list[int], threads: int, repeats: int) -> None:
    """The engine-run options of this sweep and of the benchmarks built on it (``run_settings``)."""
    parser.add_argument("--concurrency", type=int, nargs="+", default=concurrency)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=threads,
                        help="torch (OpenMP) threads per engine; on a shared 2-core machine two-thread "
                             "parallel regions stall whenever another job holds a core")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help="timed generations per concurrency; the fastest is reported, the median kept")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # see run_worker


def ran_as_worker(args, run_engine) -> bool:
    """In a process :func:`run_worker` started: run the spec read on stdin and print its result, or
    the exception that stopped the engine (type, message, traceback) as ``{"error", "exception"}``."""
    if args.worker:
        try:
            result = run_engine(json.load(sys.stdin))
        except (Exception, SystemExit) as e:  # noqa: BLE001 - any failure is the engine's result
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}", "exception": {
                "type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}}
        print("RESULT " + json.dumps(result), flush=True)
    return args.worker


def run_settings(args, prompts: list[list[int]]) -> dict:
    """The part of a worker's spec every engine of a run shares."""
    return {"prompts": prompts, "concurrency": args.concurrency, "input_len": args.input_len,
            "output_len": args.output_len, "threads": args.threads, "repeats": args.repeats}


def run_header(args, script: str) -> dict:
    """The head of a results file whose engines share ``run_settings``: the command that ran ``script``,
    the machine, the settings and the load average at the start."""
    from vllm_d2moe.byte_sizes import format_bytes

    memory = format_bytes(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return {
        "command": shlex.join(["python", f"benchmarks/{Path(script).name}", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {memory} RAM",
        "threads": args.threads, "input_len": args.input_len, "output_len": args.output_len,
        "concurrency": args.concurrency, "repeats": args.repeats, "load_average_at_start": os.getloadavg(),
    }


def cpu_setup_env(name: str, threads: int) -> dict[str, str]:
    """The environment an engine starts in under the CPU set-up ``name``: ``plain``, or parts joined by
    ``+``. ``tcmalloc``, ``iomp``: preload gperftools' tcmalloc, Intel OpenMP (``LD_PRELOAD`` names
    exactly the set-up's libraries). ``bind``: pin the engine's ``threads`` OpenMP threads one to a CPU
    with the variables vLLM's ``OMPProcessManager`` sets for a worker under ``VLLM_CPU_OMP_THREADS_BIND``:
    ``KMP_AFFINITY`` and its ``KMP_BLOCKTIME=5``, ``KMP_TPAUSE=0`` under Intel OpenMP, ``GOMP_CPU_AFFINITY``
    under torch's GNU OpenMP (which vLLM preloads otherwise). vLLM sets them only for the worker
    processes of its ``mp`` executor; the engines here run in the benchmark's worker process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) unless a layout part says otherwise:

    - ``mp``: vLLM's default process layout (engine core and model worker in processes of their
      own, as ``d2moe serve`` runs) with its default binding, ``VLLM_CPU_OMP_THREADS_BIND=auto``:
      the worker's threads are pinned to the CPUs left after one is reserved for the engine core;
    - ``mp-allcpus``: the same layout, the worker bound to every CPU this process may use;
    - ``mp-d2moe``: the same layout with the binding ``d2moe serve`` arranges
      (:func:`vllm_d2moe.cpu_setup.share_reserved_cpus`)."""
    parts = [] if name == "plain" else name.split("+")
    known = [*PRELOAD_PARTS, "bind", *LAYOUT_PARTS]
    unknown = [p for p in parts if p not in known]
    if unknown:
        raise SystemExit(f"--cpu-setups {name}: unknown part(s) {unknown}; "
                         f"'plain' or parts of {known} joined by '+'")
    layouts = [p for p in parts if p in LAYOUT_PARTS]
    if len(layouts) > 1 or (layouts and "bind" in parts):
        raise SystemExit(f"--cpu-setups {name}: at most one of {[*LAYOUT_PARTS, 'bind']} (each decides the binding)")
    wanted = [PRELOAD_PARTS[p] for p in parts if p in PRELOAD_PARTS]
    found = found_libraries(wanted)
    if len(found) < len(wanted):
        raise SystemExit(f"--cpu-setups {name}: {sorted(set(wanted) - set(found))} not installed "
                         "(scripts/install.sh installs them)")
    env = {"LD_PRELOAD": ":".join(str(path) for path in found.values())}
    if "bind" in parts:
        cpus = [str(cpu) for cpu in sorted(os.sched_getaffinity(0))[:threads]]
        if "iomp" in parts:
            env |= {"KMP_AFFINITY": f"granularity=fine,explicit,proclist=[{','.join(cpus)}]",
                    "KMP_BLOCKTIME": "5", "KMP_TPAUSE": "0"}
        else:
            env["GOMP_CPU_AFFINITY"] = " ".join(cpus)
    if layouts:
        allowed = ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0)))
        env |= {"VLLM_ENABLE_V1_MULTIPROCESSING": "1",
                "VLLM_CPU_OMP_THREADS_BIND": allowed if layouts == ["mp-allcpus"] else "auto",
                # The benchmark's worker RPCs are functions; vLLM pickles them to another process only so.
                "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
        if layouts == ["mp-d2moe"]:
            share_reserved_cpus(env)
    return env


def run_worker(spec: dict, log: Path, script: str = __file__) -> dict:
    """``spec`` in a fresh process (``script --worker``, reading it on stdin, with the variables of its
    ``env`` added); its result, or the error."""
    env = {**os.environ, **ENGINE_ENV, "OMP_NUM_THREADS": str(spec["threads"]), **spec.get("env", {})}
    try:
        proc = subprocess.run([sys.executable, script, "--worker"], input=json.dumps(spec), env=env,
                              check=False, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        with open(log, "a") as f:
            f.write(f"==== {spec['method']} {spec.get('budget_name', '')} (timed out)\n{stderr[-20000:]}\n")
        message = f"no result after {WORKER_TIMEOUT_S} s"
        return {"error": f"TimeoutExpired: {message}", "exception": {
            "type": "TimeoutExpired", "message": message, "traceback": stderr[-3000:]}}
    with open(log, "a") as f:
        f.write(f"==== {spec['method']} {spec.get('budget_name', '')}\n{proc.stderr[-20000:]}\n")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            if "exception" in result and "root cause" in result["exception"]["message"].lower():
                # vLLM's "see root cause above": a failure in an engine-core or worker process,
                # whose traceback is only in the log.
                result["exception"]["log_tracebacks"] = tracebacks(proc.stderr)[:-1]
            return result
    # No result: the process died (a signal, e.g. SIGKILL from the OOM killer) or exited early.
    code = proc.returncode
    status = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
    found = tracebacks(proc.stderr)
    last = found[-1].strip().splitlines()[-1] if found else (proc.stderr.strip().splitlines() or [""])[-1]
    return {"error": f"{status}: {last}", "exception": {
        "type": status, "message": last, "traceback": found[-1] if found else proc.stderr[-3000:],
        "log_tracebacks": found[:-1]}}


def tracebacks(log: str) -> list[str]:
    """The Python tracebacks printed in ``log``, each up to the exception line that ends it."""
    found = []
    for block in log.split("Traceback (most recent call last):")[1:]:
        lines = ["Traceback (most recent call last):"]
        for line in block.splitlines()[1:]:
            lines.append(line)
            if line and not line[0].isspace():  # frames are indented; the exception line is not
                break
        found.append("\n".join(lines))
    return found


def describe_error(result: dict) -> str:
    """What stopped an engine: the first line of the exception, then its traceback (which ends with
    the whole message) and any from engine-core processes, indented, for printing."""
    exception = result.get("exception", {})
    parts = [result["error"].splitlines()[0] if exception.get("traceback") else result["error"]]
    for trace in [*exception.get("log_tracebacks", []), exception.get("traceback", "")]:
        if trace:
            parts.append("\n".join("    " + line for line in trace.rstrip().splitlines()))
    return "\n".join(parts)


def sweep(args) -> dict:
    from vllm_d2moe.mwq.checkpoint import MWQCheckpoint

    d2moe = converted(args.model, args.cache)
    checkpoint = MWQCheckpoint(d2moe)
    prompts = text_prompts(args.model, max(args.concurrency), args.input_len)
    common = {**run_settings(args, prompts), "compiled": args.compiled}
    bits = checkpoint.spec.max_bits
    plan = [{"method": "bf16", "model": str(args.model), "quantization_config": None},
            {"method": "int8-resident", "model": str(d2moe),
             "quantization_config": {"quant_method": "d2moe", "bits": bits}}]
    plan += [{"method": method, "model": str(d2moe), "quantization_config": {"quant_method": "d2moe", **config},
              "env": env} for method, (config, env) in RESIDENT_VARIANTS.items()]
    routed = routed_copy(args.router, d2moe) if args.router else None
    for budget_name, budget in budgets(checkpoint, bits).items():
        for method, offload in OFFLOAD_METHODS.items():
            plan.append({"method": method, "model": str(d2moe), "budget_name": budget_name, "budget": budget,
                         "quantization_config": {"quant_method": "d2moe", "bits": bits, "memory_budget": budget,
                                                 "offload": {**offload, "direct": True}}})
        if routed:
            plan.append({"method": "router+budget", "model": str(routed), "budget_name": budget_name,
                         "budget": budget, "quantization_config": {
                             "quant_method": "d2moe", "memory_budget": budget,
                             "offload": {**OFFLOAD_METHODS["+budget"], "direct": True}}})
    plan = [spec for spec in plan if spec["method"] in args.methods
            and spec.get("budget_name", args.budgets[0]) in args.budgets]
    if args.cpu_setups:
        # Set-up by set-up: a run cut short still compares the methods under the set-ups it reached.
        plan = [{**spec, "cpu_setup": setup, "env": {**spec.get("env", {}), **cpu_setup_env(setup, args.threads)}}
                for setup in args.cpu_setups for spec in plan]
    log = args.results_dir / f"{args.name}.log"
    log.write_text("")
    results = []
    for spec in plan:
        started = time.perf_counter()
        result = run_worker({**common, **spec}, log)
        print(f"{spec['method']:16s} {spec.get('budget_name', 'all resident'):12s} "
              + (f"{spec['cpu_setup']:20s} " if "cpu_setup" in spec else "")
              + f"{time.perf_counter() - started:6.1f} s  "
              + (f"FAILED: {describe_error(result)}" if "error" in result
                 else " ".join(f"{r['decode_tokens_per_s']:8.1f}" for r in result["rows"])
                 + "".join(f"  (worker: {w['torch_threads']} threads on CPUs {w['cpus']})"
                           for w in result["workers"] if "cpu_setup" in spec)),
              flush=True)
        results.append({k: v for k, v in spec.items() if k not in ("prompts",)} | result
                       | {"load_average_after": os.getloadavg()})
    bf16_expert_bytes = budgets(checkpoint, bits)["1/3 bf16"] * 3
    return {
        "model": str(args.model),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs)",
        "input_len": args.input_len, "output_len": args.output_len, "concurrency": args.concurrency,
        "threads": args.threads, "repeats": args.repeats, "compiled": args.compiled,
        "load_average_at_start": os.getloadavg(),
        "bf16_expert_bytes": bf16_expert_bytes,
        "results": results,
    }


def goals(report: dict) -> list[str]:
    """The issue's targets at the "1/3 bf16" budget, judged on the highest concurrency's decode rate
    and on peak RSS."""
    runs = {(r["method"], r.get("budget_name")): r for r in report["results"] if "rows" in r}
    lines = []
    for c_index, c in enumerate(report["concurrency"]):
        def rate(key, c_index=c_index):
            return runs[key]["rows"][c_index]["decode_tokens_per_s"] if key in runs else float("nan")

        bf16 = rate(("bf16", None))
        best_on_demand = max(rate(("matryoshka-free", "1/3 bf16")), rate(("on-demand", "1/3 bf16")))
        for method in ("+budget", "router+budget"):
            if (method, "1/3 bf16") in runs:
                ours = rate((method, "1/3 bf16"))
                lines.append(f"c={c:2d}: {method} {ours:.1f} tok/s = {ours / bf16:.0%} of bf16 all-resident "
                             f"(goal >= 80%), {ours / best_on_demand:.2f}x the best on-demand baseline "
                             f"(goal >= 1.5x)")
    if ("+budget", "1/3 bf16") in runs and ("int8-resident", None) in runs:
        ours, int8 = runs[("+budget", "1/3 bf16")], runs[("int8-resident", None)]
        lines.append(f"peak RSS: pipeline {ours['peak_rss_bytes'] / 2**20:.0f} MiB = "
                     f"{ours['peak_rss_bytes'] / int8['peak_rss_bytes']:.0%} of INT8 all-resident "
                     f"{int8['peak_rss_bytes'] / 2**20:.0f} MiB (goal <= 45%); resident expert bytes "
                     f"{ours['budget'] / 2**20:.1f} MiB budget vs {report['bf16_expert_bytes'] / 2 / 2**20:.1f} MiB "
                     f"of INT8 experts (about half of the bf16 bytes)")
    return lines


def table(report: dict) -> str:
    setups = any("cpu_setup" in r for r in report["results"])
    header = ("method            budget        " + ("  cpu set-up          " if setups else "")
              + "".join(f"  c={c:<5d}" for c in report["concurrency"]))
    lines = [header + "  peak RSS  hits/reads   read     waited", "-" * (len(header) + 40)]
    for r in report["results"]:
        name = f"{r['method']:16s}  {r.get('budget_name', 'all resident'):12s}" + (
            f"  {r['cpu_setup']:20s}" if "cpu_setup" in r else "")
        if "rows" not in r:
            lines.append(f"{name}  error: {' '.join(r['error'].split())[:160]}")
            continue
        cells = "".join(f"  {row['decode_tokens_per_s']:7.1f}" for row in r["rows"])
        extra = ""
        if r["offload"]:
            t = r["offload"]["total"]
            extra = (f"  {t['hits']:>5d}/{t['misses']:<5d}  {t['bytes_read'] / 2**20:6.0f}M  "
                     f"{t['wait_seconds']:6.1f}s")
        lines.append(f"{name}{cells}  {r['peak_rss_bytes'] / 2**20:6.0f}M{extra}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrency = report["concurrency"]
    fig, axes = plt.subplots(1, len(concurrency), figsize=(4 * len(concurrency), 3.6), squeeze=False)
    runs = [r for r in report["results"] if "rows" in r]
    for i, (ax, c) in enumerate(zip(axes[0], concurrency)):
        for method in [*OFFLOAD_METHODS, "router+budget"]:
            points = sorted((r["budget"] / 2**20, r["rows"][i]["decode_tokens_per_s"])
                            for r in runs if r["method"] == method)
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        for r in runs:
            if "budget" not in r:
                setup = f", {r['cpu_setup']}" if "cpu_setup" in r else ""
                ax.axhline(r["rows"][i]["decode_tokens_per_s"], linestyle="--", color="grey" if r["method"] == "bf16"
                           else "black", label=f"{r['method']} (all resident{setup})")
        ax.axvline(report["bf16_expert_bytes"] / 3 / 2**20, color="red", linewidth=0.8, linestyle=":")
        ax.set_title(f"{c} concurrent request{'s' if c > 1 else ''}")
        ax.set_xlabel("expert memory budget (MiB)")
        ax.set_ylabel("decode tokens/s")
        ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Decode throughput vs expert memory budget (red: 1/3 of bf16 expert bytes)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="Hugging Face model directory (bf16)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "vllm_d2moe" / "budget_sweep",
                        help="where the MWQ conversion (2..8 bits, group 128) is kept")
    add_run_arguments(parser, concurrency=[1, 4, 8, 16], threads=1, repeats=3)
    parser.add_argument("--compiled", action="store_true",
                        help="serve with torch.compile (vLLM's default) instead of eager mode")
    parser.add_argument("--methods", nargs="+",
                        default=["bf16", "int8-resident", *OFFLOAD_METHODS, "router+budget"],
                        choices=["bf16", "int8-resident", *RESIDENT_VARIANTS, *OFFLOAD_METHODS, "router+budget"],
                        help="a subset of the methods (int8-resident: MWQ width 8, all resident)")
    parser.add_argument("--budgets", nargs="+", default=["one layer", "1/3 bf16", "everything"],
                        help="a subset of the budgets (offloaded methods only)")
    parser.add_argument("--router", type=Path,
                        help="a copy of the conversion with a trained router: adds the router+budget method")
    parser.add_argument("--cpu-setups", nargs="+", default=None,
                        help="run every engine once per CPU set-up: 'plain', or parts of tcmalloc, iomp, bind "
                             "joined by '+' (e.g. tcmalloc+iomp+bind); default: the environment as it is")
    parser.add_argument("--name", default="budget_sweep")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where NAME.json/.png/.log go")
    args = parser.parse_args()
    if ran_as_worker(args, run_engine):
        return
    args.results_dir.mkdir(exist_ok=True)
    report = sweep(args)
    report["goals"] = goals(report)
    (args.results_dir / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    plot(report, args.results_dir / f"{args.name}.png")
    print(table(report))
    print("\n".join(report["goals"]))


if __name__ == "__main__":
    main()
