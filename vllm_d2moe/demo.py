"""``d2moe demo``: convert the embedded reference MoE model to MWQ and generate
text from it through vLLM with ``quantization="d2moe"``, at several widths.

The embedded model is the project's own trained reference model (a small
Mixtral trained on Python and Linux documentation, shipped in
``vllm_d2moe/assets``); no model hub is needed. ``--model`` takes any other
supported Hugging Face MoE checkpoint instead.
"""

import os
import shutil
import time
from pathlib import Path

from vllm_d2moe.reference.corpus import cache_root
from vllm_d2moe.vllm_glue.llm import ENGINE_ENV, start_llm

EMBEDDED_MODEL = Path(__file__).parent / "assets" / "reference-small"
CPU_SETUP = True  # runs with vllm_d2moe.cpu_setup's binding and preloaded libraries (see there)
DEFAULT_PROMPTS = [
    "The kernel module",
    "To create a virtual environment, run",
    "A dictionary is",
    "The scheduler",
]


def add_arguments(parser) -> None:
    parser.add_argument("--model", type=Path, default=EMBEDDED_MODEL,
                        help="Hugging Face MoE checkpoint to convert (default: the embedded reference model)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the converted checkpoint goes (default: <cache>/demo)")
    parser.add_argument("--bits", type=int, nargs="+", default=None,
                        help="serving widths to generate at (default: the widest and the narrowest)")
    parser.add_argument("--min-bits", type=int, default=2)
    parser.add_argument("--max-bits", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--prompt", action="append", dest="prompts",
                        help="prompt to complete (repeatable; default: a few built-in ones)")


def converted_checkpoint(model: Path, workdir: Path, spec) -> Path:
    """The MWQ conversion of ``model`` in ``workdir``, converted now unless already there."""
    from vllm_d2moe.converters.convert import convert
    from vllm_d2moe.mwq.checkpoint import MWQCheckpoint, OutdatedFormatError

    dst = workdir / f"{model.name}-d2moe-w{spec.min_bits}-{spec.max_bits}-g{spec.group_size}"
    if dst.exists():
        try:
            MWQCheckpoint(dst).verify()
            print(f"using the converted checkpoint in {dst}")
            return dst
        except OutdatedFormatError as e:  # demo's own cache: convert again
            print(f"{e}; converting again")
            shutil.rmtree(dst)
    started = time.perf_counter()
    convert(model, dst, spec)
    print(f"converted {model} -> {dst} in {time.perf_counter() - started:.1f} s")
    return dst


def run(args) -> int:
    from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
    from vllm_d2moe.mwq.quantize import MWQSpec

    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model}: no Hugging Face checkpoint there (config.json missing)")
    spec = MWQSpec(args.min_bits, args.max_bits, args.group_size)
    workdir = args.workdir or cache_root() / "demo"
    checkpoint = converted_checkpoint(args.model, workdir, spec)
    widths = args.bits or sorted({spec.max_bits, spec.min_bits}, reverse=True)
    layers = MWQCheckpoint(checkpoint).layers.values()
    for bits in widths:
        spec.check_width(bits, "--bits")
    prompts = args.prompts or DEFAULT_PROMPTS

    for name, value in {**ENGINE_ENV, "VLLM_LOGGING_LEVEL": "WARNING"}.items():
        os.environ.setdefault(name, value)  # a user's own settings win
    from vllm import SamplingParams

    for bits in widths:
        expert_mib = sum(e.layout.nbytes(bits) * e.num_experts for e in layers) / 2**20
        print(f"\n=== vLLM, quantization='d2moe', experts at {bits} bits ({expert_mib:.1f} MiB of experts) ===")
        llm = start_llm(
            str(checkpoint),
            quantization="d2moe",
            hf_overrides={"quantization_config": {"quant_method": "d2moe", "bits": bits}},
            max_model_len=512,
        )
        # Greedy, with a repetition penalty: a model this small loops without one.
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, repetition_penalty=1.3)
        outputs = llm.generate(prompts, params)
        for prompt, out in zip(prompts, outputs):
            print(f"--- {prompt!r}\n{prompt}{out.outputs[0].text}")
        llm.llm_engine.engine_core.shutdown()
        del llm
    return 0
