"""The d2moe checkpoint: where expert blobs live on disk and how they are read.

A converted model directory holds the usual Hugging Face files (``config.json``
with ``quantization_config.quant_method == "d2moe"``, tokenizer files, and
safetensors files with every non-expert tensor in its original dtype) plus::

    d2moe/index.json                     format version, MWQ spec, per-layer layout,
                                         per-expert tensor name and CRC32 of every section
    d2moe/experts-layer-LLL.safetensors  one uint8 tensor "layers.L.experts.E" per expert:
                                         its blob (see layout.py)

The experts live in a sub-folder so that vLLM's (non-recursive) safetensors
loader never sees them; the plugin reads them itself, by byte offset, which
lets later stages stream single widths from disk. Every read is verified
against the section checksums; :class:`BlobFiles` opens every expert file once
and locates every blob through the open descriptor, so a file deleted or
replaced afterwards is still read as it was opened.
"""

import json
import mmap
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from isal import isal_zlib

from vllm_d2moe.mwq.layout import ExpertLayout
from vllm_d2moe.mwq.quantize import MWQSpec, MWQTensor

# 2: residual plane scales are 4-bit codes relative to the base scale (plane_scales.py); 1 stored
# them as float16.
FORMAT_VERSION = 2
EXPERTS_DIR = "d2moe"
INDEX_NAME = "index.json"
QUANT_METHOD = "d2moe"

# O_DIRECT needs offsets, lengths and buffers aligned to the device's logical block.
DIRECT_ALIGNMENT = 4096

# read_at(fd, offset, length, into) -> a writable buffer of those bytes (fewer at the end of the file): a view of
# ``into`` (a page-aligned buffer, or None) where it is large enough, else of a new buffer
ReadAt = Callable[[int, int, int, "mmap.mmap | None"], memoryview]


class CheckpointError(RuntimeError):
    """A d2moe checkpoint is missing, malformed or corrupt; the message names what."""


class OutdatedFormatError(CheckpointError):
    """A checkpoint written in an older format version: convert the model again."""


class CorruptSectionsError(CheckpointError):
    """Sections of one expert's blob whose bytes are not the ones the index records (a checksum
    mismatch, or cut off by a truncated file): re-reading them gives the same bytes.
    ``new_sections`` are those this error is the first to report (a store remembers the others)."""

    def __init__(self, message: str, layer: int, expert: int, sections: tuple[int, ...],
                 new_sections: tuple[int, ...]):
        super().__init__(message)
        self.layer, self.expert, self.sections, self.new_sections = layer, expert, sections, new_sections

    def __reduce__(self):  # pickled between processes: by default unpickling passes the message alone
        return type(self), (str(self), self.layer, self.expert, self.sections, self.new_sections)


def describe_section(section: int) -> str:
    return f"{section} ({'base' if section == 0 else f'residual plane {section}'})"


def expert_tensor_name(layer: int, expert: int) -> str:
    return f"layers.{layer}.experts.{expert}"


def _crc(data) -> int:
    # ISA-L's CRC32 (zlib's, 5-15x faster here, GIL released): every byte an offload read brings is
    # checked on the CPU that also computes.
    return isal_zlib.crc32(memoryview(data).cast("B")) & 0xFFFFFFFF


def section_checksums(layout: ExpertLayout, blob: torch.Tensor) -> list[int]:
    raw = blob.numpy()
    return [_crc(raw[slice(*layout.section_range(s))]) for s in range(len(layout.sections))]


@dataclass(frozen=True)
class LayerEntry:
    """One MoE layer's experts in the checkpoint."""

    layer: int
    layout: ExpertLayout
    file: str
    crc32: tuple[tuple[int, ...], ...]  # [expert][section]

    @property
    def num_experts(self) -> int:
        return len(self.crc32)


def layer_file(layer: int) -> str:
    """The file in ``EXPERTS_DIR`` that holds MoE layer ``layer``'s expert blobs."""
    return f"experts-layer-{layer:03d}.safetensors"


def write_index(model_dir: Path, spec: MWQSpec, layers: dict[int, dict], source: dict) -> dict:
    """Write the index of expert files already written (``layers``: per MoE layer its ``hidden``,
    ``intermediate``, ``num_experts``, ``file`` and ``crc32`` per expert and section); return the
    ``quantization_config`` for config.json."""
    index = {
        "format_version": FORMAT_VERSION,
        "spec": {"min_bits": spec.min_bits, "max_bits": spec.max_bits, "group_size": spec.group_size},
        "source": source,
        "layers": {str(k): v for k, v in sorted(layers.items())},
    }
    with open(Path(model_dir) / EXPERTS_DIR / INDEX_NAME, "w") as f:
        json.dump(index, f, indent=1)
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        **index["spec"],
        "num_experts": {str(k): v["num_experts"] for k, v in sorted(layers.items())},
    }


def _buffer(into: "mmap.mmap | None", nbytes: int, new: Callable[[int], "bytearray | mmap.mmap"]) -> memoryview:
    """The first ``nbytes`` of ``into`` where it holds them, else of ``new(nbytes)``. Reusing one matters: a new
    buffer's pages are faulted in and zeroed at every read, which cost more CPU than an ``O_DIRECT`` read of
    the same bytes (1.4 against 0.13 ms for 3.3 MiB here)."""
    buffer = into if into is not None and len(into) >= nbytes else new(nbytes)
    return memoryview(buffer)[:nbytes]


def read_buffered(fd: int, offset: int, length: int, into: "mmap.mmap | None" = None) -> memoryview:
    """``length`` bytes of ``fd`` from ``offset`` (fewer at its end), in a writable buffer (tensors view it):
    ``into``'s where it is large enough."""
    buffer = _buffer(into, length, bytearray)
    return buffer[: os.preadv(fd, [buffer], offset)]


def read_direct(fd: int, offset: int, length: int, into: "mmap.mmap | None" = None) -> memoryview:
    """An ``O_DIRECT`` read: the aligned blocks around the range into a page-aligned buffer (``into``'s
    where it is large enough)."""
    start = offset // DIRECT_ALIGNMENT * DIRECT_ALIGNMENT
    end = -(-(offset + length) // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
    buffer = _buffer(into, end - start, lambda nbytes: mmap.mmap(-1, nbytes))  # anonymous maps are page aligned
    got = os.preadv(fd, [buffer], start)
    return buffer[offset - start : min(offset - start + length, got)]


def safetensors_header(
    entries: list[tuple[str, str, list[int], int]], metadata: dict | None
) -> bytes:
    """A safetensors header for ``(name, dtype, shape, nbytes)`` entries laid out in order."""
    header, offset = {}, 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps tensor data 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header and the file offset where its tensor data starts."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        return _header_at(fd, path, read_buffered)
    finally:
        os.close(fd)


def _header_at(fd: int, path: Path, read_at: ReadAt) -> tuple[dict, int]:
    """``read_safetensors_header`` through an open descriptor."""
    try:
        (header_len,) = struct.unpack("<Q", read_at(fd, 0, 8))
        if 8 + header_len > os.fstat(fd).st_size:
            raise ValueError(f"a {header_len}-byte header does not fit in the file")
        return json.loads(bytes(read_at(fd, 8, header_len))), 8 + header_len
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


class BlobFiles:
    """Every expert file of a checkpoint opened once (``O_DIRECT`` with ``direct``), with every
    expert's blob located through the open descriptor: reads never look a path up again, and a
    blob missing from its file or of the wrong size is refused here, naming file and tensor."""

    def __init__(self, checkpoint: "MWQCheckpoint", direct: bool = False, read_at: ReadAt | None = None):
        self.read_at = read_at or (read_direct if direct else read_buffered)
        self.paths: dict[str, Path] = {}
        self.fds: dict[str, int] = {}
        self.offsets: dict[tuple[int, int], int] = {}  # (layer, expert) -> file offset of its blob
        try:
            headers = {}
            for _, entry in sorted(checkpoint.layers.items()):
                if entry.file not in self.fds:
                    headers[entry.file] = self._open(checkpoint.model_dir / EXPERTS_DIR / entry.file, direct)
                self._locate(entry, *headers[entry.file])
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path, direct: bool) -> tuple[dict, int]:
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        except OSError as e:
            mode = " with O_DIRECT (unsupported by this file system?)" if direct else ""
            raise CheckpointError(f"{path}: cannot open{mode} ({e})") from e
        self.paths[path.name], self.fds[path.name] = path, fd
        return _header_at(fd, path, read_direct if direct else read_buffered)

    def _locate(self, entry: "LayerEntry", header: dict, base: int) -> None:
        path = self.paths[entry.file]
        for expert in range(entry.num_experts):
            name = expert_tensor_name(entry.layer, expert)
            if name not in header:
                raise CheckpointError(f"{path}: tensor {name} is missing")
            try:
                begin, end = header[name]["data_offsets"]
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: tensor {name} has a malformed header entry ({e})") from e
            if end - begin != entry.layout.blob_nbytes:
                raise CheckpointError(
                    f"{path}: tensor {name} has {end - begin} bytes, the layout needs "
                    f"{entry.layout.blob_nbytes}"
                )
            self.offsets[(entry.layer, expert)] = base + begin

    def read(self, entry: "LayerEntry", expert: int, start: int, length: int,
             into: "mmap.mmap | None" = None) -> memoryview:
        """``length`` bytes from ``start`` of the blob of ``entry``'s expert ``expert`` (in ``into`` where it
        is large enough)."""
        try:
            return self.read_at(self.fds[entry.file], self.offsets[(entry.layer, expert)] + start, length, into)
        except OSError as e:
            raise CheckpointError(
                f"{self.paths[entry.file]}: reading layer {entry.layer} expert {expert} failed ({e})"
            ) from e

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __del__(self):
        if hasattr(self, "fds"):
            self.close()


class MWQCheckpoint:
    """Read access to the expert blobs of a converted model directory.

    Reads are positional (``os.pread``) and thread-safe; every byte returned
    has been checked against its section's CRC32.
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        index_path = self.model_dir / EXPERTS_DIR / INDEX_NAME
        if not index_path.is_file():
            raise CheckpointError(
                f"{self.model_dir} is not a d2moe checkpoint: {index_path} is missing "
                f"(convert the model with `d2moe convert SRC DST`)"
            )
        try:
            index = json.loads(index_path.read_text())
            version = index["format_version"]
            self.spec = MWQSpec(**index["spec"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: malformed index ({e})") from e
        if isinstance(version, int) and version < FORMAT_VERSION:
            raise OutdatedFormatError(
                f"{index_path}: format version {version} is outdated (this plugin reads version "
                f"{FORMAT_VERSION}, which stores residual plane scales in 4 bits); re-convert the model "
                f"with `d2moe convert SRC {self.model_dir}`"
            )
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{index_path}: format version {version} is not supported "
                f"(this plugin reads version {FORMAT_VERSION})"
            )
        self.source: dict = index.get("source", {})
        self.layers: dict[int, LayerEntry] = {
            int(k): LayerEntry(
                layer=int(k),
                layout=ExpertLayout(self.spec, v["hidden"], v["intermediate"]),
                file=v["file"],
                crc32=tuple(tuple(c) for c in v["crc32"]),
            )
            for k, v in index["layers"].items()
        }
        self._blobs: BlobFiles | None = None
        self._lock = threading.Lock()

    def layer(self, layer: int) -> LayerEntry:
        try:
            return self.layers[layer]
        except KeyError:
            raise CheckpointError(
                f"{self.model_dir}: no MoE layer {layer} in the d2moe index "
                f"(layers: {sorted(self.layers)})"
            ) from None

    def _expert(self, layer: int, expert: int) -> LayerEntry:
        entry = self.layer(layer)
        if not 0 <= expert < entry.num_experts:
            raise CheckpointError(
                f"layer {layer} has {entry.num_experts} experts; expert {expert} does not exist"
            )
        return entry

    def blob_files(self) -> BlobFiles:
        """This checkpoint's own :class:`BlobFiles` (buffered reads), opened at first use."""
        with self._lock:
            if self._blobs is None:
                self._blobs = BlobFiles(self)
            return self._blobs

    def expert_extent(self, layer: int, expert: int) -> tuple[str, int, int]:
        """``(file path, byte offset, blob bytes)`` of one expert's full blob."""
        entry = self._expert(layer, expert)
        blobs = self.blob_files()
        return str(blobs.paths[entry.file]), blobs.offsets[(layer, expert)], entry.layout.blob_nbytes

    def read_sections(
        self, layer: int, expert: int, first: int, last: int, blobs: BlobFiles | None = None,
        into: "mmap.mmap | None" = None,
    ) -> torch.Tensor:
        """Bytes of sections ``first .. last`` (inclusive) of an expert, verified.

        ``blobs`` reads the layer's blob file (the offload store passes its own); by default
        this checkpoint's :meth:`blob_files`. The bytes are read into ``into`` where it is large
        enough (:func:`read_direct`: plus up to two alignment blocks).
        """
        entry = self._expert(layer, expert)
        start, end = entry.layout.section_range(first)[0], entry.layout.section_range(last)[1]
        data = (blobs or self.blob_files()).read(entry, expert, start, end - start, into)
        self.verify_sections(layer, expert, first, last, data)
        return torch.frombuffer(data, dtype=torch.uint8)

    def verify_sections(self, layer: int, expert: int, first: int, last: int, data) -> None:
        """Check ``data``, the bytes of sections ``first .. last`` of an expert, against the index;
        every section that is cut off or fails its checksum is named in the error."""
        entry = self.layer(layer)
        path = self.model_dir / EXPERTS_DIR / entry.file
        start, end = entry.layout.section_range(first)[0], entry.layout.section_range(last)[1]
        bad = []
        for s in range(first, last + 1):
            lo, hi = (x - start for x in entry.layout.section_range(s))
            if hi > len(data) or _crc(memoryview(data)[lo:hi]) != entry.crc32[expert][s]:
                bad.append(s)
        if not bad:
            return
        if len(data) < end - start:
            message = (f"{path}: layer {layer} expert {expert} is truncated "
                       f"(read {len(data)} of {end - start} bytes)")
        else:
            named = ", ".join(map(describe_section, bad))
            message = (f"{path}: checksum mismatch in layer {layer} expert {expert} "
                       f"section{'s' if len(bad) > 1 else ''} {named}; the file is corrupt")
        raise CorruptSectionsError(message, layer, expert, tuple(bad), tuple(bad))

    def read_expert(self, layer: int, expert: int, bits: int) -> dict[str, MWQTensor]:
        """The width-``bits`` tensors of one expert (reads only that prefix)."""
        layout = self.layer(layer).layout
        self.spec.check_width(bits)
        blob = self.read_sections(layer, expert, 0, bits - self.spec.min_bits)
        return layout.decode(blob, bits)

    def verify(self) -> int:
        """Check every section of every expert; return the number of bytes verified."""
        total = 0
        for layer, entry in sorted(self.layers.items()):
            for expert in range(entry.num_experts):
                total += self.read_sections(layer, expert, 0, len(entry.layout.sections) - 1).numel()
        return total

    def __getstate__(self):
        # Sent to vLLM's worker processes: file descriptors and locks are reopened there.
        return {"model_dir": str(self.model_dir)}

    def __setstate__(self, state):
        self.__init__(state["model_dir"])

    def close(self) -> None:
        with self._lock:
            if self._blobs is not None:
                self._blobs.close()
                self._blobs = None
