"""Expert bytes from the d2moe checkpoint, read by offset for the offload pool.

Every read is a positional read of a section range of one expert's blob
(``layout.py``: width ``b`` is a prefix, an upgrade ``b -> b'`` is the sections
in between), checked against the index's CRC32s. A disk error is retried a
bounded number of times; bytes that fail their checksum (or are cut off by a
truncated file) are not: reading them again gives the same bytes. Their
sections are remembered, logged once each and never read again, and
:meth:`ExpertStore.intact_width` tells how wide that expert can still be
served. With ``direct=True`` files are opened with ``O_DIRECT`` so that reads
go to the disk, not the page cache (benchmarks). Every file is opened and every
blob located when the store is made (``BlobFiles``): a checkpoint file deleted
while serving stays readable through its open descriptor.
"""

import logging
import mmap
import threading
import time
from dataclasses import dataclass

import torch

from vllm_d2moe.mwq.checkpoint import (
    DIRECT_ALIGNMENT,
    BlobFiles,
    CheckpointError,
    CorruptSectionsError,
    MWQCheckpoint,
    ReadAt,
    describe_section,
)
from vllm_d2moe.mwq.layout import PROJECTIONS, ExpertLayout
from vllm_d2moe.mwq.quantize import MWQTensor
from vllm_d2moe.offload.injected_faults import InjectedFaults

logger = logging.getLogger(__name__)

RETRY_DELAY_S = 0.01


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
    """Verified section reads of a checkpoint's experts, disk errors retried, damaged sections
    remembered; thread-safe."""

    def __init__(
        self,
        checkpoint: MWQCheckpoint,
        direct: bool = False,
        retries: int = 2,
        read_at: ReadAt | None = None,
    ):
        self.checkpoint = checkpoint
        self.retries = retries
        self.files = BlobFiles(checkpoint, direct, read_at)
        self._damaged: dict[tuple[int, int], dict[int, str]] = {}  # (layer, expert) -> {section: error}
        self._lock = threading.Lock()
        self._scratch = threading.local()  # per thread: a buffer reads with scratch=True reuse
        self._injected = InjectedFaults.from_environment()  # None unless a test or soak asks for faults

    def layout(self, layer: int) -> ExpertLayout:
        return self.checkpoint.layer(layer).layout

    def read(self, layer: int, expert: int, first: int, last: int, scratch: bool = False) -> SectionBytes:
        """Sections ``first .. last`` of an expert, verified. A section known damaged fails the read
        at once; a failed read is retried ``retries`` times before its error is raised, unless
        its bytes failed their checksum. With ``scratch`` the bytes are in this thread's reused
        buffer: valid until the thread's next such read (for a reader that copies them at once)."""
        self._raise_if_known(layer, expert, first, last)
        into = self._scratch_buffer(layer, first, last) if scratch else None
        for attempt in range(self.retries + 1):
            try:
                if self._injected:
                    self._injected.before_read(layer, expert)
                data = self.checkpoint.read_sections(layer, expert, first, last, self.files, into)
                return SectionBytes(layer, expert, first, last, data)
            except CorruptSectionsError as e:
                raise self._remember(e) from e
            except CheckpointError as e:
                error = e
            if attempt < self.retries:
                time.sleep(RETRY_DELAY_S)
        raise CheckpointError(f"{error} (after {self.retries + 1} attempts)") from error

    def _scratch_buffer(self, layer: int, first: int, last: int) -> mmap.mmap:
        """This thread's read buffer, grown to hold sections ``first .. last`` of ``layer``'s experts and
        the alignment blocks an ``O_DIRECT`` read adds around them."""
        layout = self.layout(layer)
        nbytes = layout.section_range(last)[1] - layout.section_range(first)[0] + 2 * DIRECT_ALIGNMENT
        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None or len(buffer) < nbytes:
            buffer = self._scratch.buffer = mmap.mmap(-1, nbytes)
        return buffer

    def intact_width(self, layer: int, expert: int) -> int | None:
        """The widest width of the expert below its lowest known damaged section (``min_bits - 1``:
        the base is damaged); ``None`` while none is known damaged."""
        with self._lock:
            damaged = self._damaged.get((layer, expert))
            return None if not damaged else self.checkpoint.spec.min_bits + min(damaged) - 1

    def _raise_if_known(self, layer: int, expert: int, first: int, last: int) -> None:
        with self._lock:
            damaged = self._damaged.get((layer, expert), {})
            known = tuple(s for s in sorted(damaged) if first <= s <= last)
            if known:
                raise CorruptSectionsError(f"{damaged[known[0]]} (found before; not read again)",
                                           layer, expert, known, ())

    def _remember(self, error: CorruptSectionsError) -> CorruptSectionsError:
        """Record ``error``'s sections (each logged once); return it with the sections it is the
        first to report (another thread may have found some of them at the same time)."""
        with self._lock:
            damaged = self._damaged.setdefault((error.layer, error.expert), {})
            new = tuple(s for s in error.sections if s not in damaged)
            damaged.update({s: str(error) for s in new})
            intact = self.checkpoint.spec.min_bits + min(damaged) - 1
        for section in new:
            logger.error(
                "d2moe: MoE layer %d expert %d section %s is damaged and will not be read again; %s: %s",
                error.layer, error.expert, describe_section(section),
                f"widths up to {intact} bits of it are intact" if intact >= self.checkpoint.spec.min_bits
                else "no width of it is intact", error,
            )
        return CorruptSectionsError(str(error), error.layer, error.expert, error.sections, new)

    def close(self) -> None:
        self.files.close()
