"""``d2moe eval MODEL --out DIR``: held-out accuracy of MWQ at every width and of
two baselines, measured through vLLM on the same tokens.

Steps: cut the held-out windows (``heldout``); convert MODEL to MWQ once
(with ``--router``, add a trained bit-width router to it) and write the
fake-quantized baseline checkpoints (``variants``); score every
model with vLLM's prompt logprobs in one subprocess (``scoring``); recompute
the unquantized perplexity with transformers (``crosscheck``); write
``accuracy.md``, ``accuracy.json`` and ``accuracy.png`` to DIR (``report``).
Exit status 1 if an engine failed or vLLM and transformers disagree.
"""

import importlib.util
import shlex
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from vllm_d2moe.converters.architectures import ConversionError
from vllm_d2moe.eval.crosscheck import transformers_perplexity
from vllm_d2moe.eval.heldout import heldout_windows
from vllm_d2moe.eval.report import Setup, build_report, write_report
from vllm_d2moe.eval.scoring import score_with_vllm
from vllm_d2moe.eval.variants import METHODS, build_variants, measured_bits_per_weight, model_dtype
from vllm_d2moe.mwq.checkpoint import CheckpointError
from vllm_d2moe.mwq.quantize import MWQError, MWQSpec
from vllm_d2moe.vllm_glue.dense_method import DENSE_MODES


def add_arguments(parser) -> None:
    defaults = MWQSpec()
    parser.add_argument("model", type=Path, help="unquantized Hugging Face MoE model directory (with tokenizer)")
    parser.add_argument("--out", type=Path, required=True, help="directory for accuracy.{md,json,png}")
    parser.add_argument("--tokens", type=int, default=16384, help="held-out tokens scored (default 16384)")
    parser.add_argument("--window", type=int, default=256,
                        help="scored tokens per window (default 256, the small preset's training context)")
    parser.add_argument("--split", default="valid", choices=("valid", "test"), help="corpus split (default valid)")
    parser.add_argument("--widths", type=int, nargs="+",
                        default=list(range(defaults.min_bits, defaults.max_bits + 1)),
                        help="bit-widths for MWQ and RTN; the MWQ checkpoint spans min..max (default 2..8)")
    parser.add_argument("--group-size", type=int, default=defaults.group_size, help="columns per scale group")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="quantizers compared with the unquantized model (default: all)")
    parser.add_argument("--router", type=Path, default=None,
                        help="a trained router (router.safetensors, or a checkpoint of the same model and "
                             "MWQ spec that holds one): adds router and shuffled-mix variants")
    parser.add_argument("--router-targets", type=float, nargs="*", default=[],
                        help="target average widths served with the router (and shuffled) besides its capacities")
    parser.add_argument("--dense", nargs="+", choices=DENSE_MODES, default=[],
                        help="also serve each MWQ width with the other linear layers in this mode (d2moe option "
                             "'dense'): their accuracy cost")
    parser.add_argument("--corpus-dir", type=Path, default=None, help="default: $D2MOE_CACHE/corpus")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep converted checkpoints and raw scores here (default: a temporary directory)")


def command_line(args) -> str:
    """The full command, every option explicit, as the report records it."""
    parts = [
        "d2moe", "eval", str(args.model), "--out", str(args.out), "--tokens", str(args.tokens),
        "--window", str(args.window), "--split", args.split, "--widths", *map(str, args.widths),
        "--group-size", str(args.group_size), "--methods", *args.methods,
    ]
    if args.dense:
        parts += ["--dense", *args.dense]
    if args.router:
        parts += ["--router", str(args.router), "--router-targets", *map(str, args.router_targets)]
    return shlex.join(parts)


def evaluate(args, work_dir: Path) -> int:
    if importlib.util.find_spec("matplotlib") is None:  # needed for the plot, at the very end
        raise RuntimeError('matplotlib is not installed: pip install -e ".[eval]"')
    widths = sorted(set(args.widths))
    MWQSpec(widths[0], widths[-1], args.group_size)  # rejects bad widths before any work
    dtype = model_dtype(args.model)
    windows = heldout_windows(args.model, args.split, args.tokens, args.window, args.corpus_dir)
    print(f"d2moe eval: {windows.shape[0]} windows of {args.window} tokens; writing checkpoints", flush=True)
    variants = build_variants(args.model, work_dir, args.methods, widths, args.group_size,
                              args.router, args.router_targets, dense=args.dense)
    scores, engines = score_with_vllm(variants, windows, dtype, work_dir / "scores")
    variants = [
        replace(v, bits_per_weight=measured_bits_per_weight(v.model, engines[v.name]["width_histogram"]))
        if v.bits_per_weight is None and v.name in scores else v
        for v in variants
    ]
    setup = Setup(command_line(args), str(args.model), dtype, args.split, windows.shape[0], args.window,
                  args.group_size)
    report = build_report(setup, variants, scores, engines, transformers_perplexity(args.model, windows, dtype))
    for path in write_report(report, args.out):
        print(f"wrote {path}")
    failed = [v.name for v in variants if v.name not in scores]
    check = report.get("crosscheck", {"ok": False})
    if failed:
        print(f"d2moe eval: engines failed: {', '.join(failed)}", file=sys.stderr)
    if not check["ok"]:
        print("d2moe eval: vLLM and transformers perplexities disagree (see the report)", file=sys.stderr)
    return 1 if failed or not check["ok"] else 0


def run(args) -> int:
    try:
        if args.work_dir:
            return evaluate(args, args.work_dir)
        with tempfile.TemporaryDirectory(prefix="d2moe-eval-") as tmp:
            return evaluate(args, Path(tmp))
    except (ConversionError, MWQError, CheckpointError, OSError, RuntimeError, ValueError) as e:
        print(f"d2moe eval: error: {e}", file=sys.stderr)
        return 1
