"""MWQ expert kernels. Each backend module provides ``NAME`` and
``expert_mlp(x, gate_up, down) -> float32 [n, hidden]``; :func:`select_backend`
picks one per process."""

import logging
from types import ModuleType

logger = logging.getLogger(__name__)


def select_backend(device_type: str) -> ModuleType:
    """The kernel backend for ``device_type``, chosen once per process with the reason logged."""
    from vllm_d2moe.kernels import reference

    logger.info(
        "d2moe: expert kernel backend %r on %s (the only backend built so far)",
        reference.NAME,
        device_type,
    )
    return reference
