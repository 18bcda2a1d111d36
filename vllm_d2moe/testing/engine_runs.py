"""Run vLLM engines one after another in one process and record their greedy outputs.

``python -m vllm_d2moe.testing.engine_runs RUNS.json OUT.json``: ``RUNS.json``
is a list of runs (keys of :class:`Run`); ``OUT.json`` gets, per run, the
prompt and generated token ids, the text and the finish reason of every prompt, the full
log-probability vector of each generated position when ``logprobs`` is set,
and the error message if the engine failed. A run with ``score_against`` set
also scores the generated tokens of that run (an earlier one, or itself)
under its own model (teacher forcing: each position predicted from the *same*
prefix, in one prefill), so two models scored against the same run can be
compared position by position without one early difference derailing the
rest of the sequence. Tests share engines this way: vLLM spawns
its workers, so engines must start from a ``__main__`` module, and one
process that starts several engines pays vLLM's import once.

Engines run in vLLM's default process layout (engine core and worker spawned);
a run with ``in_process`` (or ``sample_offload``) keeps the engine core in this
process instead. Width statistics and offload counters come from the workers
either way (:func:`vllm_d2moe.engine_stats`), as ``"widths"`` and ``"offload_metrics"``.
"""

import gc
import json
import os
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

from vllm_d2moe.offload.sampling import OffloadSampler
from vllm_d2moe.vllm_glue.llm import start_llm


@dataclass
class Run:
    name: str
    model: str
    prompts: list[str]
    quantization: str | None = None
    hf_overrides: dict = field(default_factory=dict)
    max_tokens: int = 16
    logprobs: int | None = None  # full vectors: pass the vocabulary size
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1  # vLLM's CPU build runs stages > 1 compiled only (enforce_eager False)
    enable_expert_parallel: bool = False
    dtype: str = "float32"
    max_model_len: int = 512
    score_against: str | None = None  # name of this run or an earlier one in the same file
    # or the continuations to score given directly: [{"prompt_token_ids", "token_ids"}, ...]
    score_continuations: list[dict] | None = None
    # Sample the offload pools and the RSS while generating; recorded as "offload". The sampler
    # reads the pools from a thread of this process, so the engine runs in it (as with in_process).
    sample_offload: bool = False
    # Engine core (and its worker) in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) instead
    # of vLLM's default spawned process.
    in_process: bool = False
    # Per prompt (None: none), e.g. {"d2moe_target_bits": 2.5}.
    extra_args: list[dict | None] | None = None
    # vLLM's compilation config, e.g. {"cudagraph_mode": "NONE"} (None: vLLM's default).
    compilation_config: dict | None = None
    # Each prompt generated alone (one generate call each) instead of all in one batch.
    one_at_a_time: bool = False


def _logprob_vectors(positions) -> list[dict[str, float]]:
    return [{str(tok): lp.logprob for tok, lp in position.items()} for position in positions]


def _attention_config(run: Run) -> dict | None:
    """vLLM serves MLA models (DeepSeek) on CPUs with AMX through its AMX MLA backend, which takes
    bfloat16 / float16 weights only ("expect weight to be bfloat16, ..."): in float32 they run on its
    reference CPU MLA backend, which CPUs without AMX use anyway."""
    config_file = os.path.join(run.model, "config.json")
    if run.dtype != "float32" or not os.path.exists(config_file):
        return None
    with open(config_file) as f:
        return {"backend": "CPU_MLA"} if "kv_lora_rank" in json.load(f) else None


def _set_process_layout(in_process: bool) -> None:
    """vLLM reads the variable when an engine starts; an in-process engine core caches vLLM's
    environment in this process (``enable_envs_cache``), so the cache is dropped first."""
    import vllm.envs

    vllm.envs.disable_envs_cache()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"


def run_engine(run: Run, earlier: dict) -> dict:
    from vllm import SamplingParams

    from vllm_d2moe import engine_stats

    _set_process_layout(run.in_process or run.sample_offload)
    started = time.monotonic()
    llm = start_llm(
        run.model,
        quantization=run.quantization,
        hf_overrides=run.hf_overrides,
        enforce_eager=run.enforce_eager,
        tensor_parallel_size=run.tensor_parallel_size,
        pipeline_parallel_size=run.pipeline_parallel_size,
        enable_expert_parallel=run.enable_expert_parallel,
        # One process per rank only when there are ranks: in process, "uni" skips spawning
        # (and re-importing vLLM in) a worker, a third of an engine's start-up here. (Spawned,
        # vLLM's CPU platform makes it "mp": an engine-core and a worker process.)
        distributed_executor_backend="mp" if run.tensor_parallel_size * run.pipeline_parallel_size > 1 else "uni",
        dtype=run.dtype,
        max_model_len=run.max_model_len,
        max_logprobs=run.logprobs or 20,
        **({"compilation_config": run.compilation_config} if run.compilation_config else {}),
        **({"attention_config": attention} if (attention := _attention_config(run)) else {}),
    )
    start_seconds = time.monotonic() - started
    try:
        params = [
            SamplingParams(max_tokens=run.max_tokens, temperature=0.0, logprobs=run.logprobs, extra_args=extra)
            for extra in (run.extra_args or [None] * len(run.prompts))
        ]
        sampler = OffloadSampler() if run.sample_offload else nullcontext()
        engine_stats(llm, reset=True)  # vLLM's profiling and warm-up passes count too
        with sampler:
            if run.one_at_a_time:
                outputs = [llm.generate([p], [q], use_tqdm=False)[0] for p, q in zip(run.prompts, params)]
            else:
                outputs = llm.generate(run.prompts, params, use_tqdm=False)
        # Tensor-parallel ranks choose the same widths; the first worker's pools stand for all.
        stats = engine_stats(llm)[0]
        results = []
        for out in outputs:
            completion = out.outputs[0]
            record = {
                "prompt_token_ids": list(out.prompt_token_ids),
                "token_ids": list(completion.token_ids),
                "text": completion.text,
                "finish_reason": completion.finish_reason,
            }
            if run.logprobs:
                record["logprobs"] = _logprob_vectors(completion.logprobs)
            results.append(record)
        references = run.score_continuations
        if run.score_against:
            references = results if run.score_against == run.name else earlier[run.score_against]["outputs"]
        if references:
            for record, reference in zip(results, references):
                record["teacher_forced_logprobs"] = score_continuation(llm, reference, run.logprobs or 1)
        return {
            "outputs": results,
            "widths": stats["widths"],
            "controller": stats["controller"],  # the online width controller's snapshot, if one ran
            "offload_metrics": stats["offload"],
            "engine_pid": stats["pid"],  # the worker's process: this one only when in process
            "runner_pid": os.getpid(),
            "start_seconds": round(start_seconds, 1),
            **({"offload": sampler.result()} if run.sample_offload else {}),
        }
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def score_continuation(llm, reference: dict, logprobs: int) -> list[dict[str, float]]:
    """Log-prob vectors this model gives each of ``reference``'s generated positions."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = reference["prompt_token_ids"]
    scored = llm.generate(
        [TokensPrompt(prompt_token_ids=prompt + reference["token_ids"])],
        SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=logprobs),
        use_tqdm=False,
    )[0]
    # prompt_logprobs[i] is the distribution of token i given tokens < i.
    return _logprob_vectors(scored.prompt_logprobs[len(prompt) :])


def main(runs_path: str, out_path: str) -> None:
    with open(runs_path) as f:
        runs = [Run(**r) for r in json.load(f)]
    results = {}
    for run in runs:
        try:
            results[run.name] = {"run": asdict(run), **run_engine(run, results)}
        except Exception as e:  # recorded so one failed engine doesn't hide the others
            traceback.print_exc()
            results[run.name] = {"run": asdict(run), "error": f"{type(e).__name__}: {e}"}
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
