"""Fused MWQ expert MLP for x86-64 CPUs with AVX2 or AVX-512 (C++ in ``cpu_bitplanes.cpp``).

Every MWQ width is "b binary planes with per-group coefficients plus a
per-group offset". At load (:func:`prepare`) the planes are laid out for the
build that runs (:class:`ResidentPlanes`: same bytes, the MWQ tensors stay
recoverable bit for bit). AVX2 build: in pairs, each column's two bits side by
side; the kernel rebuilds 8 float32 weights in a register with, per plane pair,
a per-lane shift of one broadcast 32-bit word and a permute (``vpermilps``) of
the group's 4-entry codebook ``{0, c_i, c_j, c_i + c_j}`` (a residual plane's
coefficient decoded from its 4-bit scale code: one table load and multiply per
group), and multiplies them straight into the tokens. AVX-512 builds: one bit
per column, in tiles of 16 rows by 32 columns (each row's 32-bit word side by
side) where the groups are whole 32-column words, else as stored; 16 weights
are rebuilt with one masked add of each plane's coefficient, the plane's 16
bits loaded straight into a mask register. On tiles, up to 256 tokens (in blocks
of 8) rebuild nothing: per 4 columns a table of the 16 input sums a bit pattern
selects (less half their sum, rounded to bfloat16: see :func:`lookup_plan`),
two such tables in one 32-entry vector; one vector load brings a tile's 16 rows'
word of a plane, one 16-bit permute (``vpermw``) looks up a pattern in each of
the 32 half-rows at once and one ``vdpbf16ps`` (AVX512_BF16; two float adds
without it) adds each row's two halves (T-MAC's lookup tables), each plane's
sums scaled by its coefficients once per group. Without tiles the 16 rows'
words had to be gathered, which on an AMD EPYC (Zen 4) took 21 cycles each, more
than the lookups they fed (``benchmarks/results/kernels.md``). No float copy of
the expert exists. Where the lookup does not run, up to 8 tokens with AVX2
(blocks of 4, its 16 registers) and 24 with AVX-512 (blocks of 8, its 32
registers) the rebuilt weights feed per-token accumulators; above that a
128-row tile is rebuilt across the threads and multiplied with torch's GEMM.
Rows are split across torch's own intra-op (OpenMP) threads with
``at::parallel_for`` (small projections stay on one thread), so both cores
work and no second thread pool competes with torch's.
A whole layer call (grouping by expert and width, gather, weighted sum) is
one C++ call (:func:`layer_forward`, or the layer's :func:`bind` object, which
holds its tensors so that a call hands over only its own four): on the small
reference model the torch ops for that cost more than its experts. In it
every segment's gate/up rows share one parallel region, then one SiLU-and-
multiply covers all pairs, then every segment's down rows share another
(split across threads only from 2^21 plane-bits per thread: served through
vLLM, splitting the reference model's one-token stages cost a third of its
decode rate, ``benchmarks/results/kernels.md``). Where the rebuild is light
two rows are rebuilt side by side (their FMA chains overlap; each row's sums
are unchanged). The extension compiles at first use
(about 30 s) into torch's extensions directory (``~/.cache/torch_extensions``);
if it cannot be built the dispatcher logs why and serves with the reference.

One source, one build per instruction set (:data:`ISAS`), chosen at load by the
CPU's features and logged once with the reason: ``avx512-bf16`` (AVX-512
F/BW/VL/DQ and AVX512_BF16) or ``avx512`` (without AVX512_BF16: the lookup adds
its bfloat16 pairs with two float adds, the same sums) where torch reports them
(16-lane vectors, 32 registers, so the register path rebuilds the weights once
per 8 tokens instead of 4; group sizes that are multiples of 16), ``avx2``
otherwise. ``D2MOE_CPU_ISA`` forces one (``avx2`` on an AVX-512 CPU tests what
CPUs without it run, ``avx512`` what CPUs without AVX512_BF16 run); ``avx512-simde`` builds the AVX-512
source on SIMDe's portable intrinsics (Debian's ``libsimde-dev``), so a CPU
without AVX-512 tests its arithmetic (slowly; never chosen by itself). The
resident layout follows the build (:func:`planes_per_chunk`): pairs for AVX2,
planes as stored for both AVX-512 builds.

Why plane pairs with 4-entry codebooks: the kernel designs compared (C++ on
the planes as stored, numba lookup tables, torch's int8/int4 weight-only
kernels, bf16) and their timings are in ``benchmarks/results/kernels.md``
("Kernel designs compared"). With AVX2 a plane-as-stored kernel spends about
a cycle per plane per eight weights on data-dependent table loads; pairs with
codebooks halve the lookups and need no data-dependent loads. AVX-512's mask
registers read planes as stored for free, and its 16-entry permutes make the
lookup tables pay ("First run on AVX-512 hardware"). Torch's
int8/int4 weight-only kernels cannot run MWQ exactly: a width-b weight is
``s (q - z) + sum_j a_j (+-1)`` with arbitrary float16 residual scales
``a_j`` (4-bit codes times the base scale), not an integer code times one scale.

What bounds it: compute, about one vector instruction per plane per 8 (AVX2)
or 16 (AVX-512 rebuild) weights, so the time grows with the width while the
bytes read stay below the memory bandwidth; the AVX-512 lookup path takes
about 4 instructions per plane per 128 weights per token. With AVX2 an odd width reads its pair's second
plane too (coefficient zero): 1/b more bytes.
"""

import functools
import logging
import os
from dataclasses import dataclass

import torch
import torch.utils.cpp_extension

from vllm_d2moe.kernels import require_avx2
from vllm_d2moe.mwq.plane_scales import decode_table
from vllm_d2moe.mwq.quantize import MWQTensor
from vllm_d2moe.mwq.stacked import check_storable

logger = logging.getLogger(__name__)

NAME = "cpu-bitplanes"

_SOURCE = __file__.removesuffix(".py") + ".cpp"
# Every AVX2 CPU (Haswell, Zen on) has FMA, F16C and BMI2. Without -fopenmp the
# at::parallel_for in ATen's headers compiles to a serial loop; the OpenMP runtime
# it links is the libgomp.so.1 torch has already loaded.
_AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-mbmi2", "-fopenmp"]
# Instruction set -> compiler flags of its build; each build registers its ops as torch.ops.d2moe_cpu_<isa>.
ISAS = {
    "avx2": _AVX2_FLAGS,
    "avx512": [*_AVX2_FLAGS, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
    "avx512-bf16": [*_AVX2_FLAGS, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16"],
    "avx512-simde": [*_AVX2_FLAGS, "-DD2MOE_SIMDE_AVX512"],
}
ISA_ENV = "D2MOE_CPU_ISA"
_SLACK = 4  # the kernel reads each vector's bits of a chunk as one 32-bit word
# Tiles of planes as stored (cpu_bitplanes.cpp, tiled_layout): per group, per 16 rows, each row's 32-bit
# word of 32 columns side by side, so that the lookup path loads 16 rows' word with one vector load.
TILE_ROWS, TILE_COLUMNS = 16, 32
_modules: dict = {}  # instruction set -> its built extension


@dataclass(frozen=True)
class ResidentPlanes:
    """One projection of every expert of a layer in this backend's resident layout.

    The bit planes of a :class:`~vllm_d2moe.mwq.stacked.StackedProjection` (base
    planes, then residual planes), by the build's layout (:func:`planes_per_chunk`):
    the AVX2 build takes them two at a time, each column's two bits side by side
    (bits ``2c, 2c + 1`` of a row's stream; an odd last plane keeps one bit per
    column); the AVX-512 builds keep each plane apart, in tiles (:func:`to_tiles`)
    where the groups are whole 32-column words (``tiled``), else as stored. The same
    bytes as the planes (tiles: rows padded to a multiple of 16), plus 4 bytes of slack
    per chunk tensor; scales are the stacked ones, tiled in the tiles' order
    (:func:`scales_in_tiles`, :func:`codes_in_tiles`), plus the plane scale codes' decoding
    table (:func:`~vllm_d2moe.mwq.plane_scales.decode_table`, 64 bytes per plane).
    """

    shape: tuple[int, int]
    group_size: int
    min_bits: int
    chunks: tuple[torch.Tensor, ...]  # uint8 [experts, rows, ceil(planes in chunk * cols / 8)]
    base_scale: torch.Tensor  # float16 [experts, rows, groups] (tiled: a view, scales_in_tiles)
    base_zero: torch.Tensor  # float16 [experts, rows, groups] (tiled: a view, scales_in_tiles)
    # uint8 [experts, residual planes, rows, ceil(groups / 2)]: 4-bit codes; tiled: [..., groups, tiles, 8]
    # (codes_in_tiles)
    plane_scale: torch.Tensor
    scale_table: torch.Tensor  # float32 [residual planes, 16]
    tiled: bool  # planes in tiles (to_tiles)

    @staticmethod
    def from_stacked(p) -> "ResidentPlanes":
        load()
        planes = [p.base_bits[:, i] for i in range(p.min_bits)]
        planes += [p.plane_bits[:, j] for j in range(p.plane_bits.shape[1])]
        chunks = []
        per_chunk = planes_per_chunk()
        tiled = per_chunk == 1 and p.group_size % TILE_COLUMNS == 0
        rows = -(-p.shape[0] // TILE_ROWS) * TILE_ROWS if tiled else p.shape[0]
        for first in range(0, len(planes), per_chunk):
            pair = planes[first : first + per_chunk]
            row_bytes = (len(pair) * p.shape[1] + 7) // 8
            size = p.num_experts * rows * row_bytes
            chunk = torch.empty(size + _SLACK, dtype=torch.uint8)[:size].view(p.num_experts, rows, row_bytes)
            for e in range(p.num_experts):  # one expert's plane is contiguous
                if len(pair) == 2:
                    ops().pair_planes(pair[0][e], pair[1][e], chunk[e])
                elif tiled:
                    to_tiles(pair[0][e], p.group_size, chunk[e])
                else:
                    chunk[e].copy_(pair[0][e])
            chunks.append(chunk)
        scales = (p.base_scale, p.base_zero, p.plane_scale)
        if tiled:
            codes = codes_in_tiles(p.plane_scale, p.shape[1] // p.group_size)
            scales = (scales_in_tiles(p.base_scale), scales_in_tiles(p.base_zero), codes)
        return ResidentPlanes(
            p.shape, p.group_size, p.min_bits, tuple(chunks), *scales, decode_table(p.plane_scale.shape[1]), tiled
        )

    @property
    def bits(self) -> int:
        return self.min_bits + self.plane_scale.shape[1]

    @property
    def groups(self) -> int:
        return self.shape[1] // self.group_size

    @property
    def num_experts(self) -> int:
        return self.base_scale.shape[0]

    @property
    def planes_per_chunk(self) -> int:
        return 1 if len(self.chunks) == self.bits else 2

    @property
    def nbytes(self) -> int:
        tensors = [*self.chunks, self.base_scale, self.base_zero, self.plane_scale, self.scale_table]
        return sum(t.numel() * t.element_size() for t in tensors)

    def store(self, expert: int, t: MWQTensor) -> None:
        """Write ``t`` as expert ``expert`` (an offload pool slot); a narrower ``t`` leaves the planes
        above it undefined, which its width never reads."""
        check_storable(self, expert, t)
        self.base_scale[expert].copy_(t.base_scale)
        self.base_zero[expert].copy_(t.base_zero)
        self._store_bit_planes(expert, 0, [*t.base_bits, *(bits for bits, _ in t.planes)])
        for j, (_, scale) in enumerate(t.planes):
            self.plane_scale[expert, j].copy_(codes_in_tiles(scale, self.groups) if self.tiled else scale)

    def store_planes(self, expert: int, first: int, planes) -> None:
        """Write residual planes ``first, first + 1, ...`` ((bits, scale) pairs) of expert ``expert``:
        a width upgrade in place; the planes below stay as they are."""
        load()
        for j, (_, scale) in enumerate(planes, start=first):
            self.plane_scale[expert, j].copy_(codes_in_tiles(scale, self.groups) if self.tiled else scale)
        self._store_bit_planes(expert, self.min_bits + first, [bits for bits, _ in planes])

    def _store_bit_planes(self, expert: int, start: int, planes: list[torch.Tensor]) -> None:
        """Planes ``start .. start + len(planes)`` (base planes counted first) into their pairs; a pair
        whose first plane is already resident is unpaired to keep it."""
        load()
        end = start + len(planes)
        plane_bytes = (self.shape[1] + 7) // 8
        if self.planes_per_chunk == 1:
            for i, bits in enumerate(planes, start=start):
                if self.tiled:
                    to_tiles(bits, self.group_size, self.chunks[i][expert])
                else:
                    self.chunks[i][expert].copy_(bits)
            return
        for c in range(start // 2, (end + 1) // 2):
            chunk = self.chunks[c][expert]
            if chunk.shape[-1] == plane_bytes:  # a lone last plane
                chunk.copy_(planes[2 * c - start])
                continue
            kept_first, kept_second = (torch.empty(self.shape[0], plane_bytes, dtype=torch.uint8) for _ in range(2))
            if 2 * c < start:
                ops().unpair_planes(chunk, kept_first, kept_second)
            first = planes[2 * c - start] if 2 * c >= start else kept_first
            second = planes[2 * c + 1 - start] if 2 * c + 1 < end else kept_second
            ops().pair_planes(first.contiguous(), second.contiguous(), chunk)

    def expert(self, expert: int, bits: int | None = None) -> MWQTensor:
        """Expert ``expert`` at width ``bits`` (default: all resident planes), planes unpaired (a copy)."""
        load()
        bits = self.bits if bits is None else bits
        plane_bytes = (self.shape[1] + 7) // 8
        planes = []
        per_chunk = self.planes_per_chunk
        for chunk in self.chunks[: (bits + per_chunk - 1) // per_chunk]:
            if self.tiled:
                planes.append(from_tiles(chunk[expert], self.shape[0], self.group_size))
                continue
            if chunk.shape[-1] == plane_bytes:  # a plane as stored
                planes.append(chunk[expert].clone())
                continue
            first, second = (torch.empty(self.shape[0], plane_bytes, dtype=torch.uint8) for _ in range(2))
            ops().unpair_planes(chunk[expert], first, second)
            planes += [first, second]
        planes = planes[:bits]
        codes = [self.plane_scale[expert, j] for j in range(bits - self.min_bits)]
        if self.tiled:
            codes = [codes_from_tiles(c, self.shape[0]) for c in codes]
        return MWQTensor(
            shape=self.shape,
            group_size=self.group_size,
            base_bits=torch.stack(planes[: self.min_bits]),
            base_scale=self.base_scale[expert].contiguous(),
            base_zero=self.base_zero[expert].contiguous(),
            planes=tuple((planes[self.min_bits + j], code) for j, code in enumerate(codes)),
        )


def to_tiles(plane: torch.Tensor, group_size: int, out: torch.Tensor) -> torch.Tensor:
    """Write a plane (uint8 ``[rows, cols / 8]``, bit ``c % 8`` of byte ``c / 8`` = column ``c``) into ``out``
    (uint8 ``[ceil(rows / 16) * 16, cols / 8]``, contiguous) in tiles: for each group, for each 16 rows (zero rows
    pad the last), for each 32-column word of the group, the 16 rows' 4-byte words side by side; returns ``out``.
    In C++ (a serial loop): torch's permuted copy cost more than the read of the expert it streams into a slot."""
    load()
    ops().tile_plane(plane.contiguous(), group_size, out)
    return out


def from_tiles(tiled: torch.Tensor, rows: int, group_size: int) -> torch.Tensor:
    """The plane :func:`to_tiles` made ``tiled`` from (a copy)."""
    row_bytes = tiled.shape[-1]
    tiles, groups, words = tiled.shape[0] // TILE_ROWS, row_bytes * 8 // group_size, group_size // TILE_COLUMNS
    plane = tiled.reshape(groups, tiles, words, TILE_ROWS, 4).permute(1, 3, 0, 2, 4).reshape(-1, row_bytes)
    return plane[:rows].clone()


def scales_in_tiles(scale: torch.Tensor) -> torch.Tensor:
    """Base scales or zeros (float16 ``[experts, rows, groups]``) as tiles read them: group-major, each group's
    rows padded to whole tiles (zeros), so that a tile's 16 rows of a group are one 32-byte load; a view with
    ``scale``'s shape and values of a new ``[experts, groups, ceil(rows / 16) * 16]`` tensor."""
    experts, rows, groups = scale.shape
    padded = torch.zeros(experts, groups, -(-rows // TILE_ROWS) * TILE_ROWS, dtype=scale.dtype)
    return padded.transpose(1, 2)[:, :rows].copy_(scale)


def codes_in_tiles(codes: torch.Tensor, groups: int) -> torch.Tensor:
    """Plane scale codes (uint8 ``[..., rows, ceil(groups / 2)]``, two 4-bit codes per byte, the even group in
    the low half) as tiles read them: uint8 ``[..., groups, ceil(rows / 16), 8]``, byte ``l`` of a tile and
    group holding its row ``l`` in the low half and row ``l + 8`` in the high half (rows past the last: 0)."""
    *lead, rows, _ = codes.shape
    nibbles = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)[..., :groups]
    nibbles = torch.nn.functional.pad(nibbles, (0, 0, 0, -rows % TILE_ROWS))
    tiles = nibbles.shape[-2] // TILE_ROWS
    halves = nibbles.view(*lead, tiles, 2, TILE_ROWS // 2, groups)  # [..., tile, half, row in half, group]
    packed = halves[..., 0, :, :] | (halves[..., 1, :, :] << 4)
    return packed.movedim(-1, -3).contiguous()


def codes_from_tiles(tiled: torch.Tensor, rows: int) -> torch.Tensor:
    """The codes :func:`codes_in_tiles` made ``tiled`` from (a new tensor)."""
    *lead, groups, tiles, _ = tiled.shape
    nibbles = torch.stack((tiled & 15, tiled >> 4), dim=-2).reshape(*lead, groups, tiles * TILE_ROWS)
    nibbles = torch.nn.functional.pad(nibbles[..., :rows].transpose(-1, -2), (0, groups % 2))  # [..., rows, even]
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).contiguous()


def choose_isa() -> tuple[str, str]:
    """The instruction set whose build runs here, and why: ``D2MOE_CPU_ISA`` if set, else the best the CPU has."""
    if forced := os.environ.get(ISA_ENV):
        if forced not in ISAS:
            raise ValueError(f"{ISA_ENV}={forced!r} is not one of {', '.join(ISAS)}")
        return forced, f"set by {ISA_ENV}"
    return cpu_isa()


@functools.cache
def cpu_isa() -> tuple[str, str]:
    """The best build this CPU runs, and why."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512" and torch.cpu._is_avx512_bf16_supported():
        return "avx512-bf16", "torch reports AVX-512 (F/BW/VL/DQ) and AVX512_BF16 on this CPU"
    if capability == "AVX512":
        return "avx512", "torch reports AVX-512 (F/BW/VL/DQ), without AVX512_BF16, on this CPU"
    return "avx2", f"torch reports {capability}, no AVX-512, on this CPU"


def planes_per_chunk() -> int:
    """Planes per resident chunk in the layout of the build that runs here: 2 (pairs, AVX2), 1 (AVX-512)."""
    return 2 if choose_isa()[0] == "avx2" else 1


def _library(isa: str) -> str:
    return "d2moe_cpu_" + isa.replace("-", "_")


def ops():
    """The ops of the build :func:`load` chose (``torch.ops.d2moe_cpu_<isa>``)."""
    return getattr(torch.ops, _library(choose_isa()[0]))


def load():
    """Compile the build for this CPU (:func:`choose_isa`; cached under torch's extensions dir,
    ``~/.cache/torch_extensions``), register its ops, log the choice once and return its Python module."""
    isa, reason = choose_isa()
    if (module := _modules.get(isa)) is not None:
        return module
    require_avx2()
    library = _library(isa)
    module = torch.utils.cpp_extension.load(
        name=library.replace("d2moe_cpu", "d2moe_cpu_bitplanes", 1),
        sources=[_SOURCE],
        extra_cflags=[*ISAS[isa], f"-DD2MOE_LIBRARY={library}"],
        extra_ldflags=["-fopenmp"],
        is_python_module=True,
    )
    _modules[isa] = module
    logger.info("d2moe: cpu_bitplanes runs its %s build (%s)", isa, reason)
    return module


def prepare(projection) -> ResidentPlanes:
    """This backend's resident form of a layer's :class:`~vllm_d2moe.mwq.stacked.StackedProjection`."""
    return ResidentPlanes.from_stacked(projection)


def projection_args(p: ResidentPlanes) -> list:
    """``p`` as the ops take a projection: its chunks, then its scales and their table."""
    return [list(p.chunks), [p.base_scale, p.base_zero, p.plane_scale, p.scale_table]]


def linear(x: torch.Tensor, p: ResidentPlanes, expert: int, bits: int, out: torch.Tensor) -> None:
    """``out [tokens, rows] = x [tokens, cols] @ W^T`` for expert ``expert`` of ``p`` at width ``bits``, as a layer
    call computes a segment of ``tokens`` tokens (both float32, contiguous)."""
    load()
    ops().linear(x, *projection_args(p), p.min_bits, expert, bits, p.group_size, out)


def lookup_plan(cols: int, group_size: int, bits: int) -> tuple[int, int]:
    """How this build runs a projection of ``cols`` columns in groups of ``group_size`` at width ``bits`` by lookup
    tables: the most tokens of a segment it does (0: never), and how many leading planes (the base's, then the
    residuals') read each table entry in two bfloat16 parts, the others in one.

    The lookup's one rounding beyond float32: each table entry, the sum of 4 inputs selected by a bit pattern less
    half their sum, is rounded to bfloat16 (at most 2^-9 of itself), or with two parts the rest rounded again
    (2^-17). With one part, on OLMoE's expert shape, that is about 2e-3 RMS of a projection's output at every width,
    against 9e-3 (width 8) to 0.5 (width 2) for the weights' own quantization error, and 1e-2 for int8
    activations per group; at widths 7-8 the 2 base planes, those with the largest coefficients, read two parts
    (``benchmarks/results/kernels.md``)."""
    load()
    return tuple(ops().lookup_plan(cols, group_size, bits))


def _layer_args(gate_up: ResidentPlanes, down: ResidentPlanes) -> list:
    return [*projection_args(gate_up), *projection_args(down), gate_up.min_bits, gate_up.group_size]


def grouped_mlp(x, gate_up: ResidentPlanes, down: ResidentPlanes, segments, out) -> None:
    """See ``kernels/__init__.py``; ``out`` must be contiguous float32."""
    load()
    table = torch.tensor(
        [segments.experts, segments.bits, segments.starts[:-1], segments.starts[1:]], dtype=torch.int64
    ).T.contiguous()
    ops().moe_segments(x.float().contiguous(), table, *_layer_args(gate_up, down), out)


def layer_forward(x, topk_weights, local_ids, widths, gate_up: ResidentPlanes, down: ResidentPlanes) -> torch.Tensor:
    """See ``kernels/__init__.py``: grouping, gather and weighted scatter in the same C++ call
    (on the reference model the dozen torch ops for them cost more than its small experts)."""
    load()
    return ops().moe_forward(x, topk_weights, local_ids, widths, *_layer_args(gate_up, down))


def bind(gate_up: ResidentPlanes, down: ResidentPlanes):
    """See ``kernels/__init__.py``: :func:`layer_forward` over these projections, with the layer's tensors
    handed to C++ once (the dispatcher's parsing of the dozen tensors in their lists costs more per call
    than a decode step's expert work on the small reference model)."""
    return load().Layer(*_layer_args(gate_up, down)).forward
