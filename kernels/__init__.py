"""MWQ expert kernels, one module per backend, and the one place a backend is chosen.

A backend module provides ``NAME`` and::

    grouped_mlp(x, gate_up, down, segments, out) -> None

``x [pairs, hidden]`` (any float dtype) holds the inputs of the layer call's
(token, expert) pairs sorted by segment, ``gate_up`` / ``down`` are the layer's
resident projections, ``segments`` an :class:`vllm_d2moe.experts.ExpertSegments`;
every row of ``out [pairs, hidden]`` (float32) is written with
``down(silu(gate(x)) * up(x))`` at its segment's expert and width.

Optional hooks: ``prepare(projection)`` turns a layer's
:class:`vllm_d2moe.mwq.stacked.StackedProjection` into the backend's own resident
layout once at load (it replaces the stacked tensors, must keep the bytes
about the same and give back each expert's ``MWQTensor`` through
``.expert(e, bits)``); without it the stacked tensors are resident.
``layer_forward(x, topk_weights, local_ids, widths, gate_up, down)`` returns
what :meth:`vllm_d2moe.experts.LayerExperts.forward` would (grouping, gather
and weighted sum included), for a backend that does all of it in one call;
``bind(gate_up, down)`` returns that function with the projections already
bound (a layer makes it once, so a call hands over only its own tensors).
``load()`` does per-process set-up (a build, an import) and raises with the
reason when the backend cannot run.

Backends: ``reference`` (pure torch, the ground truth of the tests),
``cpu_bitplanes`` (x86-64 C++, an AVX2 or AVX-512 build chosen by the CPU, built at first use), ``triton_mwq`` (CUDA),
and ``cpu_int8`` (int8 activations and integer dot products, AVX2; only when named by ``D2MOE_KERNEL``).

Not a backend: ``cpu_width_select``, the per-pair width decision on CPU as
one C++ call (used by :mod:`vllm_d2moe.width_selection`).
"""

import functools
import importlib
import logging
import os
import platform
from types import ModuleType

logger = logging.getLogger(__name__)

# Names a backend explicitly (tests, benchmarks, debugging); errors are then not masked.
BACKEND_ENV = "D2MOE_KERNEL"
_BY_DEVICE = {"cuda": "triton_mwq", "cpu": "cpu_bitplanes"}


def require_avx2() -> None:
    """Raise with the reason unless this CPU runs the C++ kernels (x86-64 with AVX2, hence FMA)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64") or capability not in ("AVX2", "AVX512"):
        raise RuntimeError(f"needs an x86-64 CPU with AVX2 and FMA; this one is {platform.machine()} / {capability}")


def load_backend(name: str) -> ModuleType:
    """Import backend ``name`` and run its ``load()``; raises if it cannot run here."""
    module = importlib.import_module(f"{__name__}.{name}")
    if hasattr(module, "load"):
        module.load()
    return module


@functools.cache
def select_backend(device_type: str) -> ModuleType:
    """The kernel backend for ``device_type``, chosen once per process with the reason logged."""
    if forced := os.environ.get(BACKEND_ENV):
        backend = load_backend(forced)
        logger.info(
            "d2moe: expert kernel backend %r on %s (set by %s)", backend.NAME, device_type, BACKEND_ENV
        )
        return backend
    reference = load_backend("reference")
    name = _BY_DEVICE.get(device_type)
    if name is None:
        logger.warning("d2moe: no fused MWQ kernel for device %r; using %r", device_type, reference.NAME)
        return reference
    try:
        backend = load_backend(name)
    except Exception as e:  # noqa: BLE001 (a failed build or import must not stop serving)
        logger.warning(
            "d2moe: MWQ kernel backend %r is unavailable on %s (%s: %s); using the slower %r",
            name,
            device_type,
            type(e).__name__,
            e,
            reference.NAME,
        )
        return reference
    logger.info(
        "d2moe: expert kernel backend %r on %s (the fused kernel for this platform)",
        backend.NAME,
        device_type,
    )
    return backend
