"""Serve the embedded model from an installed (non-editable) vllm-d2moe, outside the repo.

Usage: python scripts/wheel_smoke.py WORKDIR   (run with the virtual environment's python)

Checks that the plugin imports from that environment, converts the embedded model,
serves it through ``LLM(..., quantization="d2moe")`` under vLLM's default process
layout, and that the greedy completion equals the same checkpoint's experts at 8 bits
run through transformers.
"""

import sys
from pathlib import Path

PROMPT = "The kernel module"
MAX_TOKENS = 12


def main(workdir: Path) -> int:
    import vllm_d2moe

    installed = Path(vllm_d2moe.__file__).resolve()
    if not installed.is_relative_to(Path(sys.prefix).resolve()):
        print(f"vllm_d2moe imported from {installed}, not from the environment {sys.prefix}", file=sys.stderr)
        return 1
    from vllm_d2moe.converters.convert import convert
    from vllm_d2moe.demo import EMBEDDED_MODEL
    from vllm_d2moe.mwq.quantize import MWQSpec

    checkpoint = convert(EMBEDDED_MODEL, workdir / "reference-d2moe", MWQSpec(2, 8, 128), progress=False)

    from vllm import LLM, SamplingParams

    llm = LLM(model=str(checkpoint), quantization="d2moe", dtype="float32", max_model_len=256,
              gpu_memory_utilization=0.3, enforce_eager=True)
    output = llm.generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0]
    served = list(output.outputs[0].token_ids)
    del llm

    import torch

    from vllm_d2moe.router.policy import ServingWidths
    from vllm_d2moe.router.simulate import load_simulated_model, set_mode

    model = load_simulated_model(checkpoint, ServingWidths("fixed", (8,)))
    set_mode(model, "fixed:8")
    prompt = torch.tensor([list(output.prompt_token_ids)])
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=MAX_TOKENS)
    expected = generated[0, prompt.shape[1]:].tolist()
    print(f"installed plugin at {installed.parent}; served {PROMPT!r} -> {output.outputs[0].text!r}")
    if served != expected:
        print(f"served greedy tokens {served} differ from transformers' {expected}", file=sys.stderr)
        return 1
    print(f"greedy completion ({len(served)} tokens) equals transformers at 8 bits")
    return 0


if __name__ == "__main__":  # vLLM spawns its engine core
    sys.exit(main(Path(sys.argv[1])))
