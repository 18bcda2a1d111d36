"""Byte layout of one expert's MWQ blob.

An expert has two projections, ``gate_up`` (gate rows then up rows,
``[2 * intermediate, hidden]``) and ``down`` (``[hidden, intermediate]``). Its
blob is a sequence of sections::

    section 0      base:           for each projection: base_bits, base_scale, base_zero
    section j>=1   residual plane: for each projection: plane_bits, plane_scale
                   (4-bit scale codes, two per byte: ``plane_scales.py``)

so the width-``b`` view of the expert is the prefix ``[0, end of section b - b1)``
and going from width ``b`` to ``b'`` reads only sections ``b - b1 + 1 .. b' - b1``.
Every piece starts on a 64-byte boundary, so pieces can be viewed in place as
their dtype. All experts of a layer share one layout.
"""

from dataclasses import dataclass
from functools import cached_property

import torch

from vllm_d2moe.mwq.bitpack import packed_length
from vllm_d2moe.mwq.plane_scales import packed_codes_length
from vllm_d2moe.mwq.quantize import SCALE_DTYPE, MWQError, MWQSpec, MWQTensor

PROJECTIONS = ("gate_up", "down")
ALIGNMENT = 64


def _aligned(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


@dataclass(frozen=True)
class Piece:
    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ExpertLayout:
    """Layout of an expert with ``hidden`` model width and ``intermediate`` expert width."""

    spec: MWQSpec
    hidden: int
    intermediate: int

    def shape(self, projection: str) -> tuple[int, int]:
        if projection == "gate_up":
            return (2 * self.intermediate, self.hidden)
        return (self.hidden, self.intermediate)

    def _section_pieces(self, section: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        pieces = []
        for proj in PROJECTIONS:
            rows, cols = self.shape(proj)
            groups = self.spec.num_groups(cols, f"{proj} projection")
            packed = (rows, packed_length(cols))
            if section == 0:
                pieces += [
                    (f"{proj}.base_bits", (self.spec.min_bits, *packed), torch.uint8),
                    (f"{proj}.base_scale", (rows, groups), SCALE_DTYPE),
                    (f"{proj}.base_zero", (rows, groups), SCALE_DTYPE),
                ]
            else:
                pieces += [
                    (f"{proj}.plane_bits", packed, torch.uint8),
                    (f"{proj}.plane_scale", (rows, packed_codes_length(groups)), torch.uint8),
                ]
        return pieces

    @cached_property
    def sections(self) -> tuple[tuple[Piece, ...], ...]:
        """Pieces of every section, with absolute offsets inside the blob."""
        out, offset = [], 0
        for section in range(self.spec.max_bits - self.spec.min_bits + 1):
            pieces = []
            for name, shape, dtype in self._section_pieces(section):
                piece = Piece(name, offset, shape, dtype)
                pieces.append(piece)
                offset = _aligned(offset + piece.nbytes)
            out.append(tuple(pieces))
        return tuple(out)

    @cached_property
    def section_ends(self) -> tuple[int, ...]:
        """Byte offset just past each section (the blob prefix length for width ``b1 + k``)."""
        return tuple(_aligned(s[-1].offset + s[-1].nbytes) for s in self.sections)

    def section_range(self, section: int) -> tuple[int, int]:
        start = 0 if section == 0 else self.section_ends[section - 1]
        return start, self.section_ends[section]

    def nbytes(self, bits: int) -> int:
        """Bytes of the width-``bits`` view (a prefix of the blob)."""
        return self.section_ends[self.spec.check_width(bits) - self.spec.min_bits]

    @property
    def blob_nbytes(self) -> int:
        return self.section_ends[-1]

    def encode(self, tensors: dict[str, MWQTensor]) -> torch.Tensor:
        """Serialise the full-width ``{"gate_up": ..., "down": ...}`` of one expert."""
        blob = torch.zeros(self.blob_nbytes, dtype=torch.uint8)
        for section, pieces in enumerate(self.sections):
            for piece in pieces:
                value = self._piece_value(tensors, piece.name, section)
                if tuple(value.shape) != piece.shape or value.dtype != piece.dtype:
                    raise MWQError(
                        f"expert tensor {piece.name}: expected {piece.shape} {piece.dtype}, "
                        f"got {tuple(value.shape)} {value.dtype}"
                    )
                raw = value.contiguous().view(-1).view(torch.uint8)
                blob[piece.offset : piece.offset + piece.nbytes] = raw
        return blob

    def _piece_value(self, tensors, name: str, section: int) -> torch.Tensor:
        proj, field = name.split(".")
        t = tensors[proj]
        if t.shape != self.shape(proj) or t.bits != self.spec.max_bits:
            raise MWQError(
                f"expert projection {proj}: expected shape {self.shape(proj)} at "
                f"{self.spec.max_bits} bits, got {t.shape} at {t.bits} bits"
            )
        if section == 0:
            return getattr(t, field)
        bits, scale = t.planes[section - 1]
        return bits if field == "plane_bits" else scale

    def decode(self, blob: torch.Tensor, bits: int) -> dict[str, MWQTensor]:
        """View the width-``bits`` tensors inside a blob prefix (no copy)."""
        need = self.nbytes(bits)
        if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() < need:
            raise MWQError(
                f"expert blob holds {blob.numel()} bytes; width {bits} needs {need}"
            )
        sections = []
        for pieces in self.sections[: bits - self.spec.min_bits + 1]:
            sections.append(
                {
                    p.name: blob[p.offset : p.offset + p.nbytes].view(p.dtype).view(p.shape)
                    for p in pieces
                }
            )
        base, planes = sections[0], sections[1:]
        return {
            proj: MWQTensor(
                shape=self.shape(proj),
                group_size=self.spec.group_size,
                base_bits=base[f"{proj}.base_bits"],
                base_scale=base[f"{proj}.base_scale"],
                base_zero=base[f"{proj}.base_zero"],
                planes=tuple(
                    (p[f"{proj}.plane_bits"], p[f"{proj}.plane_scale"]) for p in planes
                ),
            )
            for proj in PROJECTIONS
        }
