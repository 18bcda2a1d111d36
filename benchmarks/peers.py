"""Side by side with llama.cpp, the engine a CPU user would pick instead.

One run measures, on the same models, prompts and machine:

* llama.cpp through ``llama-cpp-python`` (``pip install -e ".[peers]"``, built from
  source): the model converted to GGUF with the converter vendored in that
  package's sdist, at f16, q8_0, q4_K_M and q2_K;
* this project in vLLM (CPU, eager, bfloat16 activations) at MWQ widths 2 / 3 /
  4 / 8 from one checkpoint, with the learned bit-width router when the
  checkpoint holds one (``d2moe train-router``), and stock vLLM bfloat16.

Models: the reference model and a random-weight model of the same architecture
with sizes in multiples of 256 (so that llama.cpp's K-quants apply to every
expert tensor), sharing the reference tokenizer so both engines get the same
prompt token ids.

Per engine (each in its own process, so peak RSS is its own): decode tokens/s
at 1 / 4 / 8 / 16 concurrent requests of ``--input-len`` prompt tokens and
``--output-len`` greedy tokens (EOS ignored), time to first token, peak RSS
split into weights / KV cache / other, and quality: KL divergence and top-1
agreement of the next-token distributions against the unquantized model
(vLLM bf16) on held-out reference-corpus text, perplexity beside them.

llama.cpp serves concurrent requests the way its server's parallel slots do:
one ``llama_decode`` per step over every active sequence, in one unified KV
cache (its C API, through ``llama_cpp``'s bindings). ``llama-cpp-python``'s own
OpenAI server has no parallel slots (it serves one request at a time), so its
concurrent throughput would equal the single-stream one.

Then the same under a memory budget below the model's expert bytes: the
budget is llama.cpp q2_K's expert bytes (its smallest standard quantization).
llama.cpp's option there is q2_K itself, all resident; this project serves
MWQ-4 and the router through its offload pool (``memory_budget``, O_DIRECT
reads). A cap on llama.cpp's resident set with mmap'd weights would need a
memory cgroup; this benchmark does not create one (the only one writable here
belongs to the sandbox that runs it), so llama.cpp paging under a cap is not
measured.

Timing runs wait for an idle machine (other processes using less than
``--idle-cpu`` of a core, measured between engines, for at most ``--idle-wait``
seconds), run an engine again (``--attempts``) when other processes used more than that
while it ran, mark the table's rows that stayed disturbed, and record the load
average at the start and end of each engine.

    python benchmarks/peers.py [--models reference random] [--concurrency 1 4 8 16] [--no-quality]

Writes ``benchmarks/results/peers.{json,md,png}``. A missing peer (llama-cpp-python
not installed, or its sdist not downloadable for the converter) is skipped with
a message.
"""

import argparse
import ctypes
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from vllm_d2moe.eval.peer_engines import llama_cpp_version

import budget_sweep

RESULTS = budget_sweep.RESULTS
REPO = budget_sweep.REPO
CACHE = Path.home() / ".cache" / "vllm_d2moe" / "peers"
LLAMA_QUANTS = ("f16", "q8_0", "q4_K_M", "q2_K")
MWQ_WIDTHS = (2, 3, 4, 8)
# The larger random model: the reference architecture with every size a multiple of 256.
RANDOM_SIZES = {
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 128,
}


# ---------------------------------------------------------------- models


def random_model(reference: Path, out: Path) -> Path:
    """The reference architecture and tokenizer at :data:`RANDOM_SIZES`, random weights (seed 0)."""
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(reference)
    for key, value in RANDOM_SIZES.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(reference / name, out / name)
    return out


def vendored_converter(version: str, cache: Path) -> Path | None:
    """``convert_hf_to_gguf.py`` (with its ``conversion`` and ``gguf-py`` folders) from the sdist of the
    installed llama-cpp-python, which ships it under ``vendor/llama.cpp``; the wheel does not."""
    root = cache / f"llama-cpp-python-{version}"
    converter = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if converter.is_file():
        return converter
    download = cache / "sdist"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--disable-pip-version-check",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"llama-cpp-python=={version}",
            "-d",
            str(download),
        ],
        check=False,  # a failed download skips the peer with pip's message
        capture_output=True,
        text=True,
    )
    archives = sorted(download.glob(f"llama_cpp_python-{version}.tar.gz"))
    if proc.returncode != 0 or not archives:
        print(
            f"peers: llama.cpp skipped: its sdist (for the GGUF converter) did not download: "
            f"{proc.stderr.strip()[-300:]}",
            flush=True,
        )
        return None
    wanted = (
        "vendor/llama.cpp/convert_hf_to_gguf.py",
        "vendor/llama.cpp/conversion/",
        "vendor/llama.cpp/gguf-py/",
    )
    with tarfile.open(archives[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.split("/", 1)[-1].startswith(wanted)]
        for member in members:
            member.name = member.name.split("/", 1)[1]
        tar.extractall(root, members=members, filter="data")
    return converter


# The converter knows BPE pre-tokenizers by a hash of their output and stops on an unknown one.
# The project's tokenizers are byte-level BPE with GPT-2's split, which llama.cpp calls "gpt-2".
CONVERT_AS_GPT2 = """
import sys, runpy
sys.path[:0] = [{root!r}, {gguf!r}]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", *{argv!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def gguf_files(model_dir: Path, converter: Path, cache: Path) -> dict[str, Path]:
    """``{quantization: GGUF file}``: f16 by the converter, the others by ``llama_model_quantize``."""
    import llama_cpp

    files = {quant: cache / f"{model_dir.name}-{quant}.gguf" for quant in LLAMA_QUANTS}
    if not files["f16"].is_file():
        code = CONVERT_AS_GPT2.format(
            root=str(converter.parent),
            gguf=str(converter.parent / "gguf-py"),
            argv=[str(model_dir), "--outfile", str(files["f16"]), "--outtype", "f16"],
            script=str(converter),
        )
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    for quant, path in files.items():
        if quant != "f16" and not path.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
            params.nthread = 2
            status = llama_cpp.llama_model_quantize(
                str(files["f16"]).encode(), str(path).encode(), ctypes.byref(params)
            )
            if status != 0:
                raise RuntimeError(f"llama_model_quantize {quant} failed with status {status}")
    return files


def gguf_expert_stats(path: Path, converter: Path) -> dict:
    """Bytes and bits per weight of a GGUF file's routed-expert tensors (``*_exps``), and of all tensors."""
    sys.path[:0] = [str(converter.parent / "gguf-py")]
    try:
        from gguf import GGUFReader
    finally:
        del sys.path[0]
    tensors = GGUFReader(path).tensors
    experts = [t for t in tensors if "_exps" in t.name]
    expert_bytes = sum(int(t.n_bytes) for t in experts)
    return {
        "expert_bytes": expert_bytes,
        "expert_bits_per_weight": 8 * expert_bytes / sum(int(t.n_elements) for t in experts),
        "tensor_bytes": sum(int(t.n_bytes) for t in tensors),
    }


# ---------------------------------------------------------------- llama.cpp engine (worker process)


class LlamaEngine:
    """A llama.cpp model and context with room for ``sequences`` sequences of ``context`` tokens each."""

    def __init__(self, path: str, sequences: int, context: int, threads: int, batch_tokens: int):
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        model_params = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(path.encode(), model_params)  # mmap'd, llama.cpp's default
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = lc.llama_context_default_params()
        params.n_ctx = sequences * context
        params.n_batch = params.n_ubatch = batch_tokens
        params.n_seq_max = sequences
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True  # one cache shared by all sequences, as llama-server's slots
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(batch_tokens, 0, sequences)
        self.batch_tokens = batch_tokens

    def clear(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of ``(token, position, sequence, wants logits)`` entries."""
        batch = self.batch
        for i, (token, position, sequence, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, logits
            batch.seq_id[i][0] = sequence
        batch.n_tokens = len(entries)
        status = self.lc.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def logits(self, index: int):
        import numpy as np

        return np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, index), shape=(self.vocab,))

    def generate(self, prompts: list[list[int]], tokens: int) -> tuple[float, float, list[list[int]]]:
        """Greedy generation of ``tokens`` tokens for every prompt at once: seconds to the first token
        of all, seconds of the rest, the tokens."""
        self.clear()
        start = time.perf_counter()
        entries, last = [], []
        for s, prompt in enumerate(prompts):
            entries += [(t, p, s, p == len(prompt) - 1) for p, t in enumerate(prompt)]
            last.append(len(entries) - 1)
        for first in range(0, len(entries), self.batch_tokens):  # prompts longer than a batch: in pieces
            self.decode(entries[first : first + self.batch_tokens])
        out = [[int(self.logits(i % self.batch_tokens).argmax())] for i in last]
        first_token = time.perf_counter() - start
        for step in range(tokens - 1):
            self.decode(
                [(seq[-1], len(prompt) + step, s, True) for s, (prompt, seq) in enumerate(zip(prompts, out))]
            )
            for s, seq in enumerate(out):
                seq.append(int(self.logits(s).argmax()))
        return first_token, time.perf_counter() - start - first_token, out

    def memory(self) -> dict:
        """Bytes of the model's tensors and of the KV cache (f16 K and V for every layer and cell)."""
        lc = self.lc
        layers, heads, kv_heads = (
            lc.llama_model_n_layer(self.model),
            lc.llama_model_n_head(self.model),
            lc.llama_model_n_head_kv(self.model),
        )
        head_dim = lc.llama_model_n_embd(self.model) // heads
        cells = lc.llama_n_ctx(self.ctx)
        return {
            "weights_bytes": int(lc.llama_model_size(self.model)),
            "kv_cache_bytes": 2 * layers * cells * kv_heads * head_dim * 2,
        }


def disk_reads() -> dict:
    """This process's bytes read from storage (``/proc/self/io``: page cache misses, mmap faults
    included) and major page faults so far."""
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {
        "bytes_read": int(io["read_bytes"]),
        "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt,
    }


def llama_throughput(spec: dict) -> dict:
    import psutil

    concurrency, output_len = spec["concurrency"], spec["output_len"]
    started = time.perf_counter()
    engine = LlamaEngine(
        spec["model"],
        max(concurrency),
        spec["input_len"] + output_len + 8,
        spec["threads"],
        batch_tokens=max(max(concurrency), 512),
    )
    start = {
        "start_seconds": time.perf_counter() - started,
        "rss_after_start_bytes": psutil.Process().memory_info().rss,
    }
    prompts = spec["prompts"]
    engine.generate(prompts[:2], 8)  # warm-up
    rows = []
    for c in concurrency:
        firsts, rates, reads = [], [], []
        for _ in range(spec["repeats"]):
            before = disk_reads()
            first, rest, out = engine.generate(prompts[:c], output_len)
            # Whole-generation reads (llama.cpp's mmap faults; a page cache miss reads from disk).
            reads.append({k: v - before[k] for k, v in disk_reads().items()} | {"seconds": first + rest})
            assert all(len(seq) == output_len for seq in out)
            firsts.append(first)
            rates.append(c * (output_len - 1) / max(rest, 1e-9))
        fastest = max(range(len(rates)), key=rates.__getitem__)
        rows.append(
            {
                "concurrency": c,
                "decode_tokens_per_s": rates[fastest],
                "all_decode_tokens_per_s": rates,
                "first_token_seconds": min(firsts),
                "disk_reads": reads[fastest],
            }
        )
    return {
        **start,
        "rows": rows,
        "memory": engine.memory(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def llama_quality(spec: dict) -> dict:
    """Scores of the held-out windows against the saved reference log-probs (vLLM's unquantized model)."""
    import numpy as np

    from vllm_d2moe.eval.scoring import compare_batches

    windows = np.load(spec["windows"])
    reference = np.load(spec["reference"], mmap_mode="r")
    count, window = windows.shape[0], windows.shape[1] - 1
    engine = LlamaEngine(spec["model"], 1, window + 1, spec["threads"], batch_tokens=window + 1)

    def batches():
        for ids in windows:
            engine.clear()
            engine.decode([(int(t), p, 0, p < window) for p, t in enumerate(ids)])
            logits = np.stack([engine.logits(p) for p in range(window)]).astype(np.float64)
            logprobs = logits - logits.max(-1, keepdims=True)
            logprobs -= np.log(np.exp(logprobs).sum(-1, keepdims=True))
            yield (
                logprobs[None].astype(np.float32),
                logprobs[np.arange(window), ids[1:]][None].astype(np.float32),
            )

    scores, _ = compare_batches(batches(), count, window, reference)
    return {"perplexity": scores.perplexity, "kl": scores.mean_kl, "top1": scores.top1_agreement}


# ---------------------------------------------------------------- the comparison (launching process)


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds busy on the whole machine (/proc/stat) and used by this process's finished children."""
    values = list(map(int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]))
    busy = (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, children.ru_utime + children.ru_stime


def busy_cores(seconds: float = 2.0) -> float:
    """Cores busy on the whole machine over ``seconds``."""
    before = cpu_seconds()[0]
    time.sleep(seconds)
    return (cpu_seconds()[0] - before) / seconds


def wait_until_idle(limit: float, patience: float) -> float:
    """Block until other processes use less than ``limit`` cores (this process is idle meanwhile), for at
    most ``patience`` seconds; the cores in use when it stops waiting."""
    waited = 0.0
    while (busy := busy_cores()) > limit and waited < patience:
        if waited == 0:
            print(f"peers: machine busy ({busy:.2f} cores), waiting", flush=True)
        time.sleep(15)
        waited += 17
    return busy


def timed_run(spec: dict, log: Path, args) -> dict:
    """The engine run least disturbed by other processes among up to ``args.attempts``: an attempt
    during which other processes used more than ``args.idle_cpu`` cores on average is run again."""
    attempts = []
    for _ in range(args.attempts):
        busy = wait_until_idle(args.idle_cpu, args.idle_wait)
        start_load, (machine0, ours0), started = os.getloadavg(), cpu_seconds(), time.perf_counter()
        result = budget_sweep.run_worker(
            spec, log, script=__file__ if spec["engine"] == "llama.cpp" else budget_sweep.__file__
        )
        (machine1, ours1), seconds = cpu_seconds(), time.perf_counter() - started
        result |= {
            "busy_cores_before": busy,
            # Cores other processes kept busy while this engine ran (machine minus the engine's own).
            "other_cores_during": max(0.0, (machine1 - machine0 - (ours1 - ours0)) / seconds),
            "load_average_at_start": start_load,
            "load_average_at_end": os.getloadavg(),
            "seconds": seconds,
        }
        attempts.append(result)
        cells = (
            f"FAILED: {budget_sweep.describe_error(result)}"
            if "error" in result
            else " ".join(f"{r['decode_tokens_per_s']:7.1f}" for r in result["rows"])
        )
        print(
            f"  {spec['name']:18s} {seconds:6.1f} s  others {result['other_cores_during']:.2f} cores  "
            + cells,
            flush=True,
        )
        if "error" in result or result["other_cores_during"] <= args.idle_cpu:
            break
    best = min(attempts, key=lambda r: r["other_cores_during"])
    best["disturbed_attempts"] = [
        {k: r[k] for k in ("other_cores_during", "rows") if k in r} for r in attempts if r is not best
    ]
    return best


def vllm_spec(name: str, model: Path, quantization_config: dict | None, **extra) -> dict:
    return {
        "engine": "vllm",
        "name": name,
        "method": name,
        "model": str(model),
        "quantization_config": quantization_config,
        **extra,
    }


def plan_engines(model_dir: Path, mwq_dir: Path, ggufs: dict[str, Path], has_router: bool) -> list[dict]:
    plan = [vllm_spec("vLLM bf16", model_dir, None)]
    plan += [vllm_spec(f"MWQ-{b}", mwq_dir, {"quant_method": "d2moe", "bits": b}) for b in MWQ_WIDTHS]
    if has_router:
        plan.append(vllm_spec("MWQ router", mwq_dir, {"quant_method": "d2moe", "width_policy": "router"}))
    plan += [
        {"engine": "llama.cpp", "name": f"llama.cpp {q}", "method": f"llama.cpp {q}", "model": str(path)}
        for q, path in ggufs.items()
    ]
    return plan


def plan_budget(mwq_dir: Path, budget: int, has_router: bool) -> list[dict]:
    offload = {"memory_budget": budget, "offload": {"direct": True}}
    plan = [vllm_spec("MWQ-4 @budget", mwq_dir, {"quant_method": "d2moe", "bits": 4, **offload})]
    if has_router:
        plan.append(
            vllm_spec(
                "MWQ router @budget", mwq_dir, {"quant_method": "d2moe", "width_policy": "router", **offload}
            )
        )
    return plan


def quality(
    model_dir: Path, mwq_dir: Path, ggufs: dict[str, Path], has_router: bool, work: Path, args
) -> dict:
    """``{engine name: {perplexity, kl, top1}}``: vLLM engines through ``d2moe eval``'s scoring, llama.cpp
    against the unquantized vLLM model's saved log-probs."""
    from vllm_d2moe.eval.heldout import heldout_windows
    from vllm_d2moe.eval.scoring import REFERENCE_FILE, score_with_vllm
    from vllm_d2moe.eval.variants import build_variants, measured_bits_per_weight, model_dtype

    windows = heldout_windows(model_dir, "valid", args.quality_tokens, args.window)
    variants = build_variants(
        model_dir,
        work,
        ["mwq"],
        list(MWQ_WIDTHS),
        128,
        router=mwq_dir if has_router else None,
        mwq_dir=mwq_dir,
    )
    names = {"unquantized": "vLLM bf16", "router": "MWQ router"} | {
        f"mwq-{b}": f"MWQ-{b}" for b in MWQ_WIDTHS
    }
    variants = [v for v in variants if v.name in names]
    scores, engines = score_with_vllm(
        variants, windows, model_dtype(model_dir), work / "scores", save_reference=True
    )
    results = {
        names[n]: {"perplexity": s.perplexity, "kl": s.mean_kl, "top1": s.top1_agreement}
        for n, s in scores.items()
    }
    results |= {names[n]: {"error": e["error"]} for n, e in engines.items() if "error" in e}
    if "MWQ router" in results and "width_histogram" in engines.get("router", {}):
        results["MWQ router"]["bits_per_weight"] = measured_bits_per_weight(
            mwq_dir, engines["router"]["width_histogram"]
        )
    np_windows = work / "scores" / "windows.npy"
    for quant, path in ggufs.items():
        spec = {
            "engine": "llama.cpp",
            "name": f"llama.cpp {quant}",
            "method": f"llama.cpp {quant} quality",
            "task": "quality",
            "model": str(path),
            "windows": str(np_windows),
            "reference": str(work / "scores" / REFERENCE_FILE),
            "threads": args.threads,
        }
        result = budget_sweep.run_worker(spec, RESULTS / f"{args.name}.log", script=__file__)
        if "error" in result:
            print(f"  {spec['name']} quality FAILED: {budget_sweep.describe_error(result)}", flush=True)
        results[spec["name"]] = result
    return {
        "tokens": int(windows.shape[0] * args.window),
        "window": args.window,
        "split": "valid",
        "engines": results,
    }


def expert_bits(mwq_dir: Path) -> dict[int, float]:
    """Stored bits per routed-expert weight of each MWQ width (scales and zeros included)."""
    from vllm_d2moe.eval.variants import stored_bits_per_weight
    from vllm_d2moe.mwq.checkpoint import MWQCheckpoint

    layouts = [(e.layout, e.num_experts) for e in MWQCheckpoint(mwq_dir).layers.values()]
    return {b: stored_bits_per_weight(layouts, b) for b in MWQ_WIDTHS}


def compare_model(label: str, model_dir: Path, args, llama_version: str | None, save) -> dict:
    """Every engine on ``model_dir``; ``save(report)`` after each (a stopped run keeps what it measured)."""
    print(f"peers: {label}: {model_dir}", flush=True)
    cache = args.cache
    mwq_dir = budget_sweep.converted(model_dir, cache)
    has_router = (mwq_dir / "d2moe" / "router.safetensors").is_file()
    if not has_router:
        print(
            f"peers: {label}: no learned router in {mwq_dir} (d2moe train-router {mwq_dir}): "
            "router rows skipped"
        )
    ggufs, gguf_stats = {}, {}
    converter = vendored_converter(llama_version, cache) if llama_version else None
    if converter:
        ggufs = gguf_files(model_dir, converter, cache)
        gguf_stats = {f"llama.cpp {q}": gguf_expert_stats(p, converter) for q, p in ggufs.items()}
    prompts = budget_sweep.text_prompts(model_dir, max(args.concurrency), args.input_len)
    common = budget_sweep.run_settings(args, prompts)
    log = RESULTS / f"{args.name}.log"
    runs = {}
    # Without the peer: 10% above MWQ-2's expert bytes, near where q2_K's would be.
    budget = gguf_stats.get("llama.cpp q2_K", {}).get("expert_bytes") or int(
        expert_bits(mwq_dir)[2] / 16 * bf16_expert_bytes(model_dir) * 1.1
    )
    report = {
        "model": str(model_dir),
        "label": label,
        "mwq_checkpoint": str(mwq_dir),
        "router": has_router,
        "bf16_expert_bytes": bf16_expert_bytes(model_dir),
        "mwq_expert_bits": expert_bits(mwq_dir),
        "gguf": {name: {"file": str(ggufs[name.split()[1]])} | stats for name, stats in gguf_stats.items()},
        "budget_bytes": budget,
        "runs": runs,
    }
    plan = plan_engines(model_dir, mwq_dir, ggufs, has_router)
    if not args.no_budget:
        plan += plan_budget(mwq_dir, budget, has_router)
    for spec in plan:
        runs[spec["name"]] = dict(spec) | timed_run(common | spec, log, args)
        save(report)
    if not args.no_quality:
        report["quality"] = quality(
            model_dir, mwq_dir, ggufs, has_router, cache / f"quality-{model_dir.name}", args
        )
    return report


def bf16_expert_bytes(model_dir: Path) -> int:
    """Bytes of the routed experts' weights at 16 bits, from config.json as the converter reads it."""
    from vllm_d2moe.converters.architectures import architecture

    config = json.loads((model_dir / "config.json").read_text())
    arch = architecture(config.get("model_type"))
    experts = len(arch.moe_layers(config)) * arch.num_experts(config)
    return experts * 3 * config["hidden_size"] * arch.intermediate_size(config) * 2


# ---------------------------------------------------------------- report


def expert_row_bits(report: dict, name: str) -> float | None:
    if name.startswith("llama.cpp"):
        return report["gguf"].get(name, {}).get("expert_bits_per_weight")
    if name.startswith("MWQ-"):
        return report["mwq_expert_bits"][int(name.split("-")[1].split()[0])] if "-" in name else None
    if name == "MWQ router":  # the widths it served while scored (expert bits per weight)
        return report.get("quality", {}).get("engines", {}).get(name, {}).get("bits_per_weight")
    return 16.0 if name == "vLLM bf16" else None


def engine_memory(run: dict) -> tuple[float, float, float, float]:
    """MiB of weights, KV cache, other (peak RSS minus both) and peak RSS."""
    mem, rss = run.get("memory", {}), run["peak_rss_bytes"]
    weights, kv = mem.get("weights_bytes", math.nan), mem.get("kv_cache_bytes", math.nan)
    return weights / 2**20, kv / 2**20, (rss - weights - kv) / 2**20, rss / 2**20


def expert_mib(report: dict, name: str, run: dict) -> float:
    if name.startswith("llama.cpp"):
        return report["gguf"].get(name, {}).get("expert_bytes", math.nan) / 2**20
    return run.get("memory", {}).get("expert_bytes", math.nan) / 2**20


def model_table(report: dict, concurrency: list[int], idle_cpu: float) -> str:
    quality = report.get("quality", {}).get("engines", {})
    columns = [
        "engine",
        "expert bits/w",
        "expert MiB",
        "weights MiB",
        "KV cache MiB",
        "other MiB",
        "peak RSS MiB",
        "first token ms (1 req)",
        *(f"tok/s {c} req" for c in concurrency),
        "KL",
        "top-1",
        "perplexity",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
    for name, run in report["runs"].items():
        if "rows" not in run:
            lines.append(f"| {name} | error: {run.get('error', '')[:150].replace('|', '/')} |")
            continue
        weights, kv, other, rss = engine_memory(run)
        bits = expert_row_bits(report, name.replace(" @budget", ""))
        q = quality.get(name.replace(" @budget", ""), {})
        if "@budget" in name:  # offloaded outputs equal the resident ones (tests/test_offload.py)
            q_cells = ["as resident"] * 3 if "kl" in q else [""] * 3
        else:
            q_cells = (
                [f"{q['kl']:.4f}", f"{q['top1']:.1%}", f"{q['perplexity']:.2f}"] if "kl" in q else [""] * 3
            )
        others = run.get("other_cores_during", 0)
        cells = [
            f"{name} (others busy: {others:.1f} cores)" if others > idle_cpu else name,
            "mixed" if bits is None else f"{bits:.2f}",
            f"{expert_mib(report, name, run):.2f}",
            f"{weights:.0f}",
            f"{kv:.0f}",
            f"{other:.0f}",
            f"{rss:.0f}",
            f"{run['rows'][0]['first_token_seconds'] * 1000:.1f}",
            # A rate from a repeat whose full generation took no longer than its prefill (a disturbed run).
            *(
                f"{r['decode_tokens_per_s']:.0f}" if r["decode_tokens_per_s"] < 1e6 else "invalid"
                for r in run["rows"]
            ),
            *q_cells,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(report: dict, concurrency: list[int], idle_cpu: float) -> list[str]:
    """The issue's three targets, judged on MWQ-4 against llama.cpp q4_K_M (the nearest average bits)."""
    runs = report["runs"]
    peer = runs.get("llama.cpp q4_K_M", {})
    if "rows" not in peer:
        return ["targets not judged: no llama.cpp q4_K_M run"]
    single = peer["rows"][0]["decode_tokens_per_s"]
    lines = []
    if peer.get("other_cores_during", 0) > idle_cpu:
        lines.append(
            "llama.cpp q4_K_M's run was disturbed by other processes: the ratios below are not judged"
        )
    for name in [n for n in runs if n.startswith("MWQ") and "rows" in runs[n]]:
        if runs[name].get("other_cores_during", 0) > idle_cpu:
            lines.append(
                f"{name}: not judged (other processes used "
                f"{runs[name]['other_cores_during']:.1f} cores while it ran)"
            )
            continue
        rates = {r["concurrency"]: r["decode_tokens_per_s"] for r in runs[name]["rows"]}
        if 8 in rates:
            ratio = rates[8] / single
            lines.append(
                f"{name}, 8 requests: {rates[8]:.0f} tok/s = {ratio:.2f}x llama.cpp q4_K_M single-stream "
                f"{single:.0f} tok/s (target >= 1.5x): {'met' if ratio >= 1.5 else 'missed'}"
            )
        ratio = rates[1] / single
        lines.append(
            f"{name}, 1 request: {rates[1]:.0f} tok/s = {ratio:.2f}x (target >= 0.7x): "
            f"{'met' if ratio >= 0.7 else 'missed'}"
        )
    for ours, theirs in (
        ("MWQ-2", "llama.cpp q2_K"),
        ("MWQ-4", "llama.cpp q4_K_M"),
        ("MWQ-8", "llama.cpp q8_0"),
    ):
        if ours in runs and "rows" in runs[ours] and theirs in report["gguf"]:
            a = runs[ours]["memory"].get("expert_bytes", math.nan)
            b = report["gguf"][theirs]["expert_bytes"]
            our_bits = report["mwq_expert_bits"][int(ours[-1])]
            their_bits = report["gguf"][theirs]["expert_bits_per_weight"]
            lines.append(
                f"resident experts {ours} {a / 2**20:.2f} MiB ({our_bits:.2f} bits/w) vs {theirs} "
                f"{b / 2**20:.2f} MiB ({their_bits:.2f} bits/w): "
                f"{'no larger (met)' if a <= b else 'larger (missed)'}"
            )
    return lines


def fmt_load(load) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def markdown(full: dict) -> str:
    out = [
        f"# This project vs llama.cpp ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `{full['command']}`",
        "",
        (
            f"Machine: {full['machine']}; llama-cpp-python {full['llama_cpp_python']}; {full['threads']} "
            f"threads per engine; {full['input_len']} prompt tokens, {full['output_len']} generated (greedy, "
            f"EOS ignored); fastest of {full['repeats']} repeats. Load average at start "
            f"{fmt_load(full['load_average_at_start'])}, at end {fmt_load(full['load_average_at_end'])}; "
            "each engine's load averages and the cores other processes used while it ran are in the JSON; "
            f"a row marked 'others busy' ran while they used more than {full['idle_cpu']} cores on average."
        ),
        "",
    ]
    for report in full["models"]:
        out += [
            f"## {report['label']}: `{report['model']}`",
            "",
            (
                f"bf16 expert bytes {report['bf16_expert_bytes'] / 2**20:.1f} MiB; budget (llama.cpp q2_K's "
                f"expert bytes) {report['budget_bytes'] / 2**20:.2f} MiB. Quality on "
                f"{report.get('quality', {}).get('tokens', 0)} held-out tokens vs vLLM bf16."
            ),
            "",
            model_table(report, full["concurrency"], full["idle_cpu"]),
            "",
        ]
        out += [f"- {line}" for line in targets(report, full["concurrency"], full["idle_cpu"])] + [""]
    return "\n".join(out)


def throughput_panel(
    ax, runs: dict, concurrency: list[int], title: str, dotted: str, crossed: str | None = None, rate=None
) -> None:
    """Decode tokens/s against concurrent requests on log axes, a line per engine that ran: llama.cpp
    dashed, names containing ``dotted`` dotted, names containing ``crossed`` marked x. ``rate(row)``
    (default: the row's rate) may return NaN for a rate not to draw."""
    import matplotlib.ticker

    for name, run in runs.items():
        if "rows" in run:
            style = "--" if name.startswith("llama.cpp") else (":" if dotted in name else "-")
            ax.plot(
                [r["concurrency"] for r in run["rows"]],
                [rate(r) if rate else r["decode_tokens_per_s"] for r in run["rows"]],
                style,
                marker="x" if crossed and crossed in name else "o",
                label=name,
            )
    ax.set(title=title, xlabel="concurrent requests", ylabel="decode tokens/s", xscale="log", yscale="log")
    ax.set_xticks(concurrency, [str(c) for c in concurrency])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend(fontsize=7)


def plot(full: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = full["models"]
    fig, axes = plt.subplots(2, len(models), figsize=(6.5 * len(models), 8), squeeze=False)
    for column, report in enumerate(models):
        throughput_panel(
            axes[0][column], report["runs"], full["concurrency"], f"{report['label']}: decode throughput", "@budget"
        )
        ax = axes[1][column]
        for name, q in report.get("quality", {}).get("engines", {}).items():
            bits = expert_row_bits(report, name)
            if "kl" in q and bits is not None and name != "vLLM bf16":
                ax.scatter(bits, max(q["kl"], 1e-6), marker="s" if name.startswith("llama.cpp") else "o")
                ax.annotate(name, (bits, max(q["kl"], 1e-6)), fontsize=7)
        ax.set(
            title=f"{report['label']}: KL vs unquantized",
            xlabel="routed-expert bits per weight",
            ylabel="KL divergence (nats/token)",
            yscale="log",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="*", choices=("reference", "random"), default=["reference", "random"]
    )
    parser.add_argument(
        "--checkpoints",
        nargs="+",
        type=Path,
        default=[],
        help="more models: Hugging Face checkpoint directories with a tokenizer (d2moe random-model shapes)",
    )
    parser.add_argument("--no-budget", action="store_true", help="skip the runs under a memory budget")
    parser.add_argument(
        "--cache",
        type=Path,
        default=CACHE,
        help="conversions (MWQ 2..8 g128, GGUF), the random model and quality work files",
    )
    budget_sweep.add_run_arguments(parser, concurrency=[1, 4, 8, 16], threads=2, repeats=2)
    parser.add_argument(
        "--idle-cpu",
        type=float,
        default=0.3,
        help="start an engine only when the machine uses fewer cores than this",
    )
    parser.add_argument(
        "--attempts", type=int, default=2, help="runs of an engine while other processes disturb it, at most"
    )
    parser.add_argument(
        "--idle-wait", type=float, default=900, help="longest wait for an idle machine before each engine (s)"
    )

    parser.add_argument("--no-quality", action="store_true", help="skip the KL / top-1 / perplexity runs")
    parser.add_argument("--quality-tokens", type=int, default=4096, help="held-out tokens scored")
    parser.add_argument("--window", type=int, default=256, help="scored tokens per held-out window")
    parser.add_argument("--name", default="peers")
    parser.add_argument(
        "--render", action="store_true", help="rewrite NAME.md and NAME.png from NAME.json (no measurement)"
    )
    args = parser.parse_args()
    if args.render:
        full = json.loads((RESULTS / f"{args.name}.json").read_text())
        for report in full["models"]:
            report["mwq_expert_bits"] = {int(b): bits for b, bits in report["mwq_expert_bits"].items()}
            report["targets"] = targets(report, full["concurrency"], full["idle_cpu"])
        (RESULTS / f"{args.name}.json").write_text(json.dumps(full, indent=1))
        (RESULTS / f"{args.name}.md").write_text(markdown(full))
        plot(full, RESULTS / f"{args.name}.png")
        return
    if budget_sweep.ran_as_worker(
        args, lambda spec: llama_quality(spec) if spec.get("task") == "quality" else llama_throughput(spec)
    ):
        return
    RESULTS.mkdir(exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.log").write_text("")
    llama_version = llama_cpp_version()
    reference = budget_sweep.DEFAULT_MODEL
    models = {
        "reference": lambda: reference,
        "random": lambda: random_model(reference, args.cache / "random-mixtral-1024"),
    }
    full = budget_sweep.run_header(args, __file__) | {
        "llama_cpp_python": llama_version or "not installed",
        "idle_cpu": args.idle_cpu,
    }
    done = []

    def save(report: dict) -> None:  # the files are rewritten after each engine: a stopped run keeps them
        report["targets"] = targets(report, args.concurrency, args.idle_cpu)
        full["models"] = [*done, report]
        full["load_average_at_end"] = os.getloadavg()
        (RESULTS / f"{args.name}.json").write_text(json.dumps(full, indent=1))
        (RESULTS / f"{args.name}.md").write_text(markdown(full))
        plot(full, RESULTS / f"{args.name}.png")

    for checkpoint in args.checkpoints:
        if not (checkpoint / "config.json").is_file() or not (checkpoint / "tokenizer.json").is_file():
            parser.error(f"--checkpoints {checkpoint}: no config.json and tokenizer.json there")
        models[checkpoint.name] = lambda checkpoint=checkpoint: checkpoint
    for label in [*args.models, *(c.name for c in args.checkpoints)]:
        report = compare_model(label, models[label](), args, llama_version, save)
        save(report)
        done.append(report)
    print(markdown(full))


if __name__ == "__main__":
    main()
