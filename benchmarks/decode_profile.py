"""Where a decode step's time goes, stock vLLM bf16 against MWQ, in vLLM's eager and compiled modes.

Each (method, mode) serves the reference model in its own process (engine in
that process, ``--threads`` torch threads, bfloat16 activations, greedy, EOS
ignored) and is measured three ways at each concurrency:

1. plain: decode tokens/s as ``benchmarks/budget_sweep.py`` measures it
   (full generation minus the prefill-only one, fastest of ``--repeats``);
2. timed: wall-clock timers wrapped around the engine step, the scheduler,
   the model runner's ``execute_model`` / ``_model_forward`` / ``sample_tokens``,
   the attention backend's forward and the MoE layer (for MWQ: the
   ``d2moe.moe_experts`` op, the width decision, the expert forward), each
   as microseconds per decode step (again full minus prefill-only);
3. torch.profiler: self CPU time per op and per decode step (same subtraction),
   which also sees inside torch.compile's graph, where the timers of stock
   vLLM's MoE cannot reach.

The timers and the profiler cost time of their own (the timed rates say how
much); the plain rates are the numbers to compare. Writes
``benchmarks/results/<name>.json`` and prints the tables that
``benchmarks/results/decode_profile.md`` discusses.

    python benchmarks/decode_profile.py [--methods bf16 mwq4] [--modes eager compiled] [--concurrency 1 8]
"""

import argparse
import collections
import functools
import json
import os
import sys
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from budget_sweep import (
    DEFAULT_MODEL,
    RESULTS,
    add_run_arguments,
    converted,
    describe_error,
    ran_as_worker,
    run_worker,
    text_prompts,
)

METHODS = {
    "bf16": None,
    "mwq2": {"quant_method": "d2moe", "bits": 2},
    "mwq3": {"quant_method": "d2moe", "bits": 3},
    "mwq4": {"quant_method": "d2moe", "bits": 4},
    "mwq8": {"quant_method": "d2moe", "bits": 8},
    "mwq4-dense-int8": {"quant_method": "d2moe", "bits": 4, "dense": "int8"},
    "mwq4-dense-w8a8": {"quant_method": "d2moe", "bits": 4, "dense": "w8a8"},
    # The offload pipeline at --stream-fraction of the MWQ-4 expert bytes (its memory_budget set in main).
    "mwq4-streamed": {"quant_method": "d2moe", "bits": 4},
}


# ---------------------------------------------------------------- timers (worker process)


class Timers:
    """Wall time and calls per name, from wrappers installed on vLLM's and this project's functions."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.calls = collections.Counter()
        self.on = False

    def wrap(self, name, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            if not self.on:
                return function(*args, **kwargs)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed

    def patch(self, owner, attribute, name):
        setattr(owner, attribute, self.wrap(name, getattr(owner, attribute)))

    def take(self) -> tuple[dict, dict]:
        seconds, calls = dict(self.seconds), dict(self.calls)
        self.seconds.clear()
        self.calls.clear()
        return seconds, calls


def install_timers(llm, timers: Timers) -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    core = llm.llm_engine.engine_core.engine_core
    timers.patch(core, "step_fn", "engine step")
    timers.patch(Scheduler, "schedule", "scheduler")
    timers.patch(Scheduler, "update_from_output", "scheduler")
    timers.patch(GPUModelRunner, "execute_model", "execute_model")
    timers.patch(GPUModelRunner, "_model_forward", "model forward")
    timers.patch(GPUModelRunner, "sample_tokens", "sample_tokens")
    timers.patch(CPUAttentionBackendImpl, "forward", "attention (backend forward)")
    # Stock MoE: the runner (routing + experts) and the expert kernel call; torch.compile
    # traces both into its graph, where these wrappers never run.
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    timers.patch(MoERunner, "forward", "MoE layer (runner forward)")
    timers.patch(CPUUnquantizedExperts, "apply", "stock MoE: cpu_fused_moe")
    # MWQ: the op body as the dispatcher runs it (compiled mode; eager calls it directly, which
    # only the parts below see) and its parts. The layer forward is timed where it still goes
    # through ``cpu_bitplanes.layer_forward`` (the tree before ``bind``).
    from vllm_d2moe import experts, width_selection
    from vllm_d2moe.kernels import cpu_bitplanes
    from vllm_d2moe.vllm_glue import expert_op

    time_op_body(expert_op, timers)
    timers.patch(width_selection.WidthSelector, "__call__", "d2moe: width decision (WidthSelector)")
    timers.patch(experts.LayerExperts, "forward", "d2moe: LayerExperts.forward")
    timers.patch(cpu_bitplanes, "layer_forward", "d2moe: cpu_bitplanes.layer_forward")
    from vllm_d2moe.offload.layer import OffloadedLayerExperts

    timers.patch(OffloadedLayerExperts, "forward", "d2moe: offloaded layer forward (reads waited + compute)")


def time_op_body(expert_op, timers: Timers) -> None:
    """Replace the CPU kernel of ``d2moe::moe_experts`` with a timed call of the same Python function."""
    import torch

    library = torch.library.Library("d2moe", "IMPL")
    library.impl(
        "moe_experts", timers.wrap("d2moe: op moe_experts (Python body)", expert_op._moe_experts), "CPU"
    )
    expert_op._TIMING_LIBRARY = library  # kept alive with the module


# ---------------------------------------------------------------- one engine (worker process)


def run_engine(spec: dict) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_d2moe.vllm_glue.llm import start_llm

    llm = start_llm(
        spec["model"],
        hf_overrides={"quantization_config": spec["quantization_config"]}
        if spec["quantization_config"]
        else None,
        dtype="bfloat16",
        enforce_eager=spec["mode"] == "eager",
        max_model_len=spec["input_len"] + spec["output_len"] + 8,
        max_num_seqs=max(spec["concurrency"]),
    )
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]

    cpu_seconds = []  # process CPU time of each generate(), beside its wall time

    def generate(n: int, tokens: int) -> float:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        start, cpu_start = time.perf_counter(), time.process_time()
        llm.generate(prompts[:n], params, use_tqdm=False)
        cpu_seconds.append(time.process_time() - cpu_start)
        return time.perf_counter() - start

    generate(2, 8)  # warm-up
    for c in spec["concurrency"]:
        generate(c, 4)  # each batch shape once (compiled mode: shape specialisation)
    steps = spec["output_len"] - 1
    timers = Timers()
    install_timers(llm, timers)
    rows = []
    for c in spec["concurrency"]:
        plain, plain_cpu = [], []
        for _ in range(spec["repeats"]):
            prefill = generate(c, 1)
            plain.append(generate(c, spec["output_len"]) - prefill)
            plain_cpu.append(cpu_seconds[-1] - cpu_seconds[-2])
        row = {
            "concurrency": c,
            "step_ms_plain": min(plain) / steps * 1e3,
            "decode_tokens_per_s_plain": c * steps / min(plain),
            "all_decode_tokens_per_s_plain": [c * steps / p for p in plain],
            # With one thread, CPU time is immune to other jobs taking the core (not to their
            # use of caches and memory bandwidth); with more it includes OpenMP's spin-waits.
            "step_cpu_ms_plain": min(plain_cpu) / steps * 1e3,
        }
        rows.append(row)
        if spec["plain"]:
            continue
        timers.on = True
        prefill_s = generate(c, 1)
        prefill_timers, prefill_calls = timers.take()
        full_s = generate(c, spec["output_len"])
        full_timers, full_calls = timers.take()
        timers.on = False
        per_step = {k: (full_timers[k] - prefill_timers.get(k, 0.0)) / steps * 1e6 for k in full_timers}
        calls = {k: (full_calls[k] - prefill_calls.get(k, 0)) / steps for k in full_calls}
        with profile(activities=[ProfilerActivity.CPU]) as prefill_prof:
            generate(c, 1)
        with profile(activities=[ProfilerActivity.CPU]) as full_prof:
            generate(c, spec["output_len"])
        before = {e.key: e.self_cpu_time_total for e in prefill_prof.key_averages()}
        before_calls = {e.key: e.count for e in prefill_prof.key_averages()}
        ops = sorted(
            (
                {
                    "op": e.key,
                    "self_us_per_step": (e.self_cpu_time_total - before.get(e.key, 0)) / steps,
                    "calls_per_step": (e.count - before_calls.get(e.key, 0)) / steps,
                }
                for e in full_prof.key_averages()
            ),
            key=lambda r: -r["self_us_per_step"],
        )
        row |= {
            "step_ms_timed": (full_s - prefill_s) / steps * 1e3,
            "timers_us_per_step": per_step,
            "timer_calls_per_step": calls,
            "profiler_ops": ops[:25],
            "profiler_total_self_us_per_step": sum(r["self_us_per_step"] for r in ops),
        }
    return {"rows": rows, "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------- launcher


def streamed_budget(d2moe: Path, fraction: Fraction) -> int:
    from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
    from vllm_d2moe.offload.pool import expert_nbytes

    layers = list(MWQCheckpoint(d2moe).layers.values())
    experts = sum(entry.num_experts for entry in layers)
    return int(fraction * experts * expert_nbytes(layers[0].layout, 4))


def report_lines(result: dict) -> list[str]:
    lines = []
    for row in result["rows"]:
        lines.append(
            f"  c={row['concurrency']}: plain {row['decode_tokens_per_s_plain']:.1f} tok/s "
            f"({row['step_ms_plain']:.3f} ms/step, CPU {row['step_cpu_ms_plain']:.3f} ms/step)"
        )
        if "timers_us_per_step" not in row:
            continue
        lines.append(f"    timed {row['step_ms_timed']:.3f} ms/step")
        for name, us in sorted(row["timers_us_per_step"].items(), key=lambda kv: -kv[1]):
            lines.append(
                f"    {name:45s} {us:8.1f} us/step  {row['timer_calls_per_step'][name]:6.1f} calls/step"
            )
        lines.append(
            f"    profiler: {row['profiler_total_self_us_per_step']:.1f} us/step self time in ops; top:"
        )
        for op in row["profiler_ops"][:12]:
            lines.append(
                f"      {op['op'][:60]:60s} {op['self_us_per_step']:8.1f} us  {op['calls_per_step']:5.1f}x"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "vllm_d2moe" / "budget_sweep")
    parser.add_argument("--methods", nargs="+", default=["bf16", "mwq4"], choices=METHODS)
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    add_run_arguments(parser, concurrency=[1, 8], threads=2, repeats=3)
    parser.add_argument("--plain", action="store_true", help="decode rates only: no timers, no profiler")
    parser.add_argument("--stream-fraction", type=Fraction, default=Fraction(1, 4),
                        help="mwq4-streamed's memory_budget, as a share of the MWQ-4 expert bytes (default 1/4)")
    parser.add_argument("--name", default="decode_profile")
    args = parser.parse_args()
    if ran_as_worker(args, run_engine):
        return
    d2moe = converted(args.model, args.cache)
    prompts = text_prompts(args.model, max(args.concurrency), args.input_len)
    log = RESULTS / f"{args.name}.log"
    log.write_text("")
    report = {
        "load_average_at_start": os.getloadavg(),
        "threads": args.threads,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "runs": [],
    }
    for method in args.methods:
        for mode in args.modes:
            config = METHODS[method]
            if method == "mwq4-streamed":
                config = config | {"memory_budget": streamed_budget(d2moe, args.stream_fraction)}
            spec = {
                "method": method,
                "mode": mode,
                "model": str(args.model if config is None else d2moe),
                "quantization_config": config,
                "prompts": prompts,
                "concurrency": args.concurrency,
                "input_len": args.input_len,
                "output_len": args.output_len,
                "threads": args.threads,
                "repeats": args.repeats,
                "plain": args.plain,
            }
            result = run_worker(spec, log, __file__)
            print(f"== {method} {mode}", flush=True)
            print("\n".join(report_lines(result)) if "rows" in result else f"FAILED: {describe_error(result)}",
                  flush=True)
            report["runs"].append({"method": method, "mode": mode} | result)
    report["load_average_at_end"] = os.getloadavg()
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
