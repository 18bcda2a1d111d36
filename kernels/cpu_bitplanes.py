"""Fused MWQ expert MLP for x86-64 CPUs with AVX2 (C++ in ``cpu_bitplanes.cpp``).

DRAFT docstring: numbers filled in after benchmarking.
"""

import platform

import torch
import torch.utils.cpp_extension

NAME = "cpu-bitplanes-avx2"

_SOURCE = __file__.removesuffix(".py") + ".cpp"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c"]
_loaded = False


def load() -> None:
    """Compile the extension (cached under torch's extensions dir, ``~/.cache/torch_extensions``) and register its op."""
    global _loaded
    if _loaded:
        return
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64") or capability not in ("AVX2", "AVX512"):
        raise RuntimeError(f"needs an x86-64 CPU with AVX2 and FMA; this one is {platform.machine()} / {capability}")
    torch.utils.cpp_extension.load(
        name="d2moe_cpu_bitplanes", sources=[_SOURCE], extra_cflags=_FLAGS, is_python_module=False
    )
    _loaded = True


def grouped_mlp(x, gate_up, down, segments, out) -> None:
    """See ``kernels/__init__.py``; ``out`` must be contiguous float32."""
    load()
    table = torch.tensor(
        [segments.experts, segments.bits, segments.starts[:-1], segments.starts[1:]], dtype=torch.int64
    ).T.contiguous()
    torch.ops.d2moe_cpu.moe_segments(
        x.float().contiguous(), table, gate_up.tensors, down.tensors, gate_up.group_size, out
    )
