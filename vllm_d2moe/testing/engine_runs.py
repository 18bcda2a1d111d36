"""Run vLLM engines one after another in one process and record their greedy outputs.

``python -m vllm_d2moe.testing.engine_runs RUNS.json OUT.json``: ``RUNS.json``
is a list of runs (keys of :class:`Run`); ``OUT.json`` gets, per run, the
generated token ids and text of every prompt, the full log-probability
vector of each generated position when ``logprobs`` is set, and the error
message if the engine failed. Tests share engines this way: vLLM spawns
its workers, so engines must start from a ``__main__`` module, and one
process that starts several engines pays vLLM's import once.
"""

import gc
import json
import sys
import traceback
from dataclasses import asdict, dataclass, field


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
    enable_expert_parallel: bool = False
    dtype: str = "float32"
    max_model_len: int = 512


def run_engine(run: Run) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=run.model,
        quantization=run.quantization,
        hf_overrides=run.hf_overrides or None,
        enforce_eager=run.enforce_eager,
        tensor_parallel_size=run.tensor_parallel_size,
        enable_expert_parallel=run.enable_expert_parallel,
        distributed_executor_backend="mp" if run.tensor_parallel_size > 1 else None,
        dtype=run.dtype,
        max_model_len=run.max_model_len,
        max_logprobs=run.logprobs or 20,
        gpu_memory_utilization=0.3,
        seed=0,
    )
    try:
        params = SamplingParams(max_tokens=run.max_tokens, temperature=0.0, logprobs=run.logprobs)
        outputs = llm.generate(run.prompts, params, use_tqdm=False)
        results = []
        for out in outputs:
            completion = out.outputs[0]
            record = {"token_ids": list(completion.token_ids), "text": completion.text}
            if run.logprobs:
                record["logprobs"] = [
                    {str(tok): lp.logprob for tok, lp in position.items()}
                    for position in completion.logprobs
                ]
            results.append(record)
        return {"outputs": results}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def main(runs_path: str, out_path: str) -> None:
    with open(runs_path) as f:
        runs = [Run(**r) for r in json.load(f)]
    results = {}
    for run in runs:
        try:
            results[run.name] = {"run": asdict(run), **run_engine(run)}
        except Exception as e:  # recorded so one failed engine doesn't hide the others
            traceback.print_exc()
            results[run.name] = {"run": asdict(run), "error": f"{type(e).__name__}: {e}"}
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
