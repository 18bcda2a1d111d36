"""The one place this project's offline vLLM engines are built (tests, eval, Ray replicas, demo, benchmarks),
and the environment the ones in their own processes start in."""

# vLLM reserves its CPU KV cache up front (GiB per engine; its default is larger).
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def start_llm(model: str, *, hf_overrides: dict | None = None, **options):
    """``vllm.LLM`` for ``model`` with the options every engine here shares, which ``options`` (any
    other ``LLM`` argument) override: ``gpu_memory_utilization`` 0.3, so that several engines and
    the processes beside them fit one machine, and ``seed`` 0; an empty ``hf_overrides`` is none."""
    from vllm import LLM

    return LLM(model=model, hf_overrides=hf_overrides or None, **{"gpu_memory_utilization": 0.3, "seed": 0, **options})
