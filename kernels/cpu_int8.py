"""MWQ expert MLP with int8 activations and integer dot products, llama.cpp's way (C++ in ``cpu_int8.cpp``).

Not chosen by itself: ``D2MOE_KERNEL=cpu_int8`` selects it (tests, benchmarks, ``d2moe eval``).
Each projection's inputs are quantized per token and per weight group to int8
(``t = max|x| / 127``, ``c = round(x / t)``; llama.cpp's q8 activations use blocks of 32
or 256), then every product of a group is an exact integer dot product of the
stored planes with the codes: the base codes ``q`` (rebuilt from the base
planes) and each residual sign plane's 0/1 bits times ``c``, 32 bytes at a time
with ``vpmaddubsw``, each plane weighted by its integer coefficient (the format's
plane scales are ``s * k * 2**-(j + 7)`` with integer ``k``, ``plane_scales.py``)
with ``vpmaddwd``; one float FMA per group and token (``cpu_int8.cpp``). The
weights are not requantized: the only rounding is the activations', at most half
a step (``max|x| / 254`` of its group) per input.

What bounds it, against ``cpu_bitplanes``: a plane's 32 bytes cost two
instructions to rebuild (shift, AND) and every token then pays one multiply-add
per plane per 32 weights, where the float kernel rebuilds 8 float weights from
two planes with a lookup and pays one FMA per 8 weights whatever the width. So
it does least work at one token and narrow widths, and its per-token cost grows
with the width. Measured side by side, and its accuracy cost on the reference
model: ``benchmarks/results/kernels_int8.md``.

Two builds of one source (:data:`BUILDS`): AVX2, 32 columns per vector, a plane's
bytes rebuilt by a shift and an AND in an interleaved column order the activations
follow; AVX-512 BW, 64 columns per vector, a plane's bytes one masked move from a
mask register loaded from memory, columns in order. The AVX-512 build runs where
``cpu_bitplanes`` runs its ``avx512`` build (the CPU's choice or ``D2MOE_CPU_ISA``)
and the group size is a multiple of 64; otherwise the AVX2 build; each choice is
logged once.

Reads the layer's stacked planes as they are (no resident layout of its own);
needs group sizes that are multiples of 32 (up to 1024) and at most 7 base planes.
"""

import functools
import logging

import torch
import torch.utils.cpp_extension

from vllm_d2moe.kernels import cpu_bitplanes, require_avx2
from vllm_d2moe.mwq.plane_scales import decode_table
from vllm_d2moe.mwq.quantize import MWQError
from vllm_d2moe.mwq.stacked import StackedProjection

logger = logging.getLogger(__name__)

NAME = "cpu-int8"

_SOURCE = __file__.removesuffix(".py") + ".cpp"
# Build -> (compiler flags, columns per vector: one word of a plane, the group sizes it takes are multiples).
BUILDS = {"avx2": (cpu_bitplanes.ISAS["avx2"], 32), "avx512": (cpu_bitplanes.ISAS["avx512"], 64)}
COLUMNS = BUILDS["avx2"][1]  # every group size must be a multiple of it
MAX_GROUP_SIZE = 1024
MAX_BASE_PLANES = 7


def build_for(group_size: int) -> tuple[str, str]:
    """The build that runs projections of ``group_size``, and why."""
    isa, reason = cpu_bitplanes.choose_isa()
    if isa not in ("avx512", "avx512-bf16"):  # the int8 path uses no AVX512_BF16 instruction
        return "avx2", f"cpu_bitplanes runs {isa} here ({reason})"
    if group_size % BUILDS["avx512"][1]:
        return "avx2", f"group size {group_size} is not a multiple of {BUILDS['avx512'][1]}"
    return "avx512", reason


@functools.cache
def _compile(build: str) -> None:
    require_avx2()
    flags, _ = BUILDS[build]
    torch.utils.cpp_extension.load(
        name=f"d2moe_cpu_int8_{build}",
        sources=[_SOURCE],
        extra_cflags=[*flags, f"-DD2MOE_LIBRARY=d2moe_cpu_int8_{build}"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
    )


@functools.cache
def _announce(build: str, group_size: int, reason: str) -> None:
    _compile(build)
    logger.info("d2moe: cpu_int8 runs its %s build for group size %d (%s)", build, group_size, reason)


def _ops(group_size: int):
    """The ops (``torch.ops.d2moe_cpu_int8_<build>``) of the build for ``group_size``, compiled at first use
    (cached under torch's extensions dir, ``TORCH_EXTENSIONS_DIR``); the choice is logged once."""
    build, reason = build_for(group_size)
    _announce(build, group_size, reason)
    return getattr(torch.ops, f"d2moe_cpu_int8_{build}")


def load() -> None:
    """Compile the build this CPU runs (its AVX2 fallback at first use of a group size it cannot run);
    raises with the reason when this CPU cannot run it."""
    _compile(build_for(BUILDS["avx512"][1])[0])


def prepare(projection: StackedProjection) -> StackedProjection:
    """The stacked projection itself (this backend reads the planes as stored), after checking it can run it."""
    if projection.group_size % COLUMNS or projection.group_size > MAX_GROUP_SIZE:
        raise MWQError(
            f"D2MOE_KERNEL=cpu_int8: group size {projection.group_size} is not a multiple of {COLUMNS} "
            f"up to {MAX_GROUP_SIZE}; use the default kernel for this checkpoint"
        )
    if projection.min_bits > MAX_BASE_PLANES:
        raise MWQError(
            f"D2MOE_KERNEL=cpu_int8: min_bits {projection.min_bits} is above {MAX_BASE_PLANES} (base codes must "
            f"fit vpmaddubsw's unsigned bytes twice in int16); use the default kernel for this checkpoint"
        )
    return projection


@functools.cache
def _scale_table(planes: int) -> torch.Tensor:
    return decode_table(planes)


def _tensors(p: StackedProjection) -> list[torch.Tensor]:
    return [p.base_bits, p.base_scale, p.base_zero, p.plane_bits, p.plane_scale, _scale_table(p.plane_bits.shape[1])]


def linear(x: torch.Tensor, projection: StackedProjection, expert: int, bits: int, out: torch.Tensor) -> None:
    """``out = x @ W.T`` (contiguous float32 ``[tokens, rows]``) of expert ``expert``'s projection at width
    ``bits``, ``x`` taken as int8 activations: one projection of :func:`grouped_mlp`."""
    _ops(projection.group_size).linear(
        x.float().contiguous(), _tensors(projection), projection.group_size, expert, bits, out
    )


def grouped_mlp(x, gate_up: StackedProjection, down: StackedProjection, segments, out) -> None:
    """See ``kernels/__init__.py``; ``out`` must be contiguous float32."""
    table = torch.tensor(
        [segments.experts, segments.bits, segments.starts[:-1], segments.starts[1:]], dtype=torch.int64
    ).T.contiguous()
    _ops(gate_up.group_size).moe_segments(
        x.float().contiguous(), table, _tensors(gate_up), _tensors(down), gate_up.group_size, out
    )
