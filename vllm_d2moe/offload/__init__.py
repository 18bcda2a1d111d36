"""Expert offloading under a memory budget (the ``memory_budget`` option).

``budget`` parses the option, ``store`` reads verified expert sections from
the checkpoint, ``pool`` holds experts resident in fixed slots, ``pipeline``
orders loads hottest-expert-bit-first and overlaps them with compute,
``metrics`` counts, ``layer`` and ``manager`` put it together for vLLM.
"""

from vllm_d2moe.offload.manager import OffloadManager, metrics_snapshots

__all__ = ["OffloadManager", "metrics_snapshots"]
