"""Expert bytes from the d2moe checkpoint, read by offset for the offload pool.

Every read is a positional read of a section range of one expert's blob
(``layout.py``: width ``b`` is a prefix, an upgrade ``b -> b'`` is the sections
in between), checked against the index's CRC32s and retried a bounded number
of times. With ``direct=True`` files are opened with ``O_DIRECT`` so that
reads go to the disk, not the page cache (benchmarks). Files are opened when
the store is made: a checkpoint file deleted while serving stays readable
through its open descriptor.
"""

import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_d2moe.mwq.checkpoint import EXPERTS_DIR, CheckpointError, MWQCheckpoint, read_buffered
from vllm_d2moe.mwq.layout import PROJECTIONS, ExpertLayout
from vllm_d2moe.mwq.quantize import MWQTensor

# O_DIRECT needs offsets, lengths and buffers aligned to the device's logical block.
DIRECT_ALIGNMENT = 4096
RETRY_DELAY_S = 0.01

# read_at(fd, offset, length) -> buffer holding at least those bytes from ``offset``
ReadAt = Callable[[int, int, int], memoryview]


def read_direct(fd: int, offset: int, length: int) -> memoryview:
    """An ``O_DIRECT`` read: the aligned blocks around the range into a page-aligned buffer."""
    start = offset // DIRECT_ALIGNMENT * DIRECT_ALIGNMENT
    end = -(-(offset + length) // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
    buffer = mmap.mmap(-1, end - start)  # anonymous maps are page aligned
    got = os.preadv(fd, [buffer], start)
    return memoryview(buffer)[offset - start : min(offset - start + length, got)]


@dataclass(frozen=True)
class SectionBytes:
    """Verified bytes of sections ``first .. last`` of one expert."""

    layer: int
    expert: int
    first: int
    last: int
    data: torch.Tensor  # uint8

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def tensors(self, layout: ExpertLayout) -> dict[str, MWQTensor]:
        """The expert at width ``min_bits + last``; only for reads that start at the base."""
        assert self.first == 0
        return layout.decode(self.data, layout.spec.min_bits + self.last)

    def planes(self, layout: ExpertLayout) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per projection, the ``(bits, scale)`` residual planes ``first .. last`` (views)."""
        assert self.first > 0
        start = layout.section_range(self.first)[0]

        def view(piece):
            lo = piece.offset - start
            return self.data[lo : lo + piece.nbytes].view(piece.dtype).view(piece.shape)

        out = {proj: [] for proj in PROJECTIONS}
        for section in layout.sections[self.first : self.last + 1]:
            pieces = {p.name: p for p in section}
            for proj in PROJECTIONS:
                out[proj].append((view(pieces[f"{proj}.plane_bits"]), view(pieces[f"{proj}.plane_scale"])))
        return out


class ExpertStore:
    """Verified, retried section reads of a checkpoint's experts; thread-safe."""

    def __init__(
        self,
        checkpoint: MWQCheckpoint,
        direct: bool = False,
        retries: int = 2,
        read_at: ReadAt | None = None,
    ):
        self.checkpoint = checkpoint
        self.direct = direct
        self.retries = retries
        self.read_at = read_at or (read_direct if direct else read_buffered)
        self._fds: dict[str, int] = {}
        for entry in checkpoint.layers.values():
            path = checkpoint.model_dir / EXPERTS_DIR / entry.file
            if entry.file in self._fds:
                continue
            try:
                self._fds[entry.file] = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            except OSError as e:
                mode = " with O_DIRECT (unsupported by this file system?)" if direct else ""
                raise CheckpointError(f"{path}: cannot open{mode} ({e})") from e

    def layout(self, layer: int) -> ExpertLayout:
        return self.checkpoint.layer(layer).layout

    def read(self, layer: int, expert: int, first: int, last: int) -> SectionBytes:
        """Sections ``first .. last`` of an expert, verified; a failed read or a checksum
        mismatch is retried ``retries`` times before the last error is raised."""
        for attempt in range(self.retries + 1):
            try:
                data = self.checkpoint.read_sections(layer, expert, first, last, self._read)
                return SectionBytes(layer, expert, first, last, data)
            except CheckpointError as e:
                error = e
            if attempt < self.retries:
                time.sleep(RETRY_DELAY_S)
        raise CheckpointError(f"{error} (after {self.retries + 1} attempts)") from error

    def _read(self, file: str, offset: int, length: int) -> memoryview:
        return self.read_at(self._fds[file], offset, length)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        if hasattr(self, "_fds"):
            self.close()
