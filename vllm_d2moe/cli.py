"""The ``d2moe`` command.

Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int | None``; modules are imported
only when their subcommand runs, so ``d2moe --help`` stays fast. A module with
``CPU_SETUP = True`` (those that start vLLM engines) is run, from the command line,
with :mod:`vllm_d2moe.cpu_setup`'s thread binding on small machines and under the
libraries it preloads.
"""

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "convert": ("vllm_d2moe.converters.convert", "convert a Hugging Face MoE checkpoint to MWQ"),
    "random-model": (
        "vllm_d2moe.converters.random_model",
        "write a random-weight checkpoint with a real MoE model's config (e.g. olmoe-1b-7b)",
    ),
    "inspect": ("vllm_d2moe.mwq.inspect", "print a d2moe checkpoint's layout and verify checksums"),
    "serve": ("vllm_d2moe.serve", "run vLLM's OpenAI server (takes exactly `vllm serve`'s arguments)"),
    "demo": ("vllm_d2moe.demo", "build, convert and serve the embedded default model"),
    "train-reference": ("vllm_d2moe.reference.train", "train the project's reference MoE model"),
    "eval": ("vllm_d2moe.eval.harness", "held-out perplexity/KL of MWQ widths and baselines through vLLM"),
    "train-router": ("vllm_d2moe.router.train", "train a checkpoint's bit-width routers offline"),
    "train-predictor": (
        "vllm_d2moe.prefetch.train",
        "train a checkpoint's learned expert predictor (prefetch) offline",
    ),
    "placement": ("vllm_d2moe.placement", "which experts and widths each rank holds resident; disk reads per token"),
    "ray-batch": ("vllm_d2moe.replicas.batch", "JSONL prompts through data-parallel vLLM replicas (Ray actors)"),
    "ray-serve": ("vllm_d2moe.replicas.serving", "OpenAI server replicas (Ray actors) behind one load-balancing port"),
}


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None  # a caller's own process is never replaced (re-executed)
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="d2moe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints usage or the unknown-command error
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    if from_command_line and getattr(module, "CPU_SETUP", False):
        from vllm_d2moe.cpu_setup import reexec_with_preload, share_reserved_cpus

        share_reserved_cpus()  # before the re-exec, which inherits it
        reexec_with_preload(["-m", "vllm_d2moe.cli", *argv])
    sub_parser = argparse.ArgumentParser(prog=f"d2moe {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub_parser)
    if getattr(module, "PASS_THROUGH", False):
        return module.run(rest) or 0
    return module.run(sub_parser.parse_args(rest)) or 0


if __name__ == "__main__":
    sys.exit(main())
