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
against the section checksums.
"""

import json
import os
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_d2moe.mwq.layout import ExpertLayout
from vllm_d2moe.mwq.quantize import MWQSpec, MWQTensor

FORMAT_VERSION = 1
EXPERTS_DIR = "d2moe"
INDEX_NAME = "index.json"
QUANT_METHOD = "d2moe"

# read(blob file name, offset, length) -> a writable buffer of those bytes (fewer at the end of the file)
FileRead = Callable[[str, int, int], memoryview]


class CheckpointError(RuntimeError):
    """A d2moe checkpoint is missing, malformed or corrupt; the message names what."""


def expert_tensor_name(layer: int, expert: int) -> str:
    return f"layers.{layer}.experts.{expert}"


def _crc(data) -> int:
    return zlib.crc32(memoryview(data).cast("B")) & 0xFFFFFFFF


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


def read_buffered(fd: int, offset: int, length: int) -> memoryview:
    """``length`` bytes of ``fd`` from ``offset`` (fewer at its end), in a writable buffer (tensors view it)."""
    buffer = bytearray(length)
    return memoryview(buffer)[: os.preadv(fd, [buffer], offset)]


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
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(header_len)), 8 + header_len
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _safetensors_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute ``(offset, nbytes)`` of each tensor in a safetensors file."""
    header, base = read_safetensors_header(path)
    return {
        name: (base + meta["data_offsets"][0], meta["data_offsets"][1] - meta["data_offsets"][0])
        for name, meta in header.items()
        if name != "__metadata__"
    }


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
        self._offsets: dict[str, dict[str, tuple[int, int]]] = {}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def layer(self, layer: int) -> LayerEntry:
        try:
            return self.layers[layer]
        except KeyError:
            raise CheckpointError(
                f"{self.model_dir}: no MoE layer {layer} in the d2moe index "
                f"(layers: {sorted(self.layers)})"
            ) from None

    def _file(self, name: str) -> tuple[int, dict[str, tuple[int, int]]]:
        with self._lock:
            if name not in self._fds:
                path = self.model_dir / EXPERTS_DIR / name
                offsets = _safetensors_offsets(path)
                self._fds[name] = os.open(path, os.O_RDONLY)
                self._offsets[name] = offsets
            return self._fds[name], self._offsets[name]

    def expert_extent(self, layer: int, expert: int) -> tuple[str, int, int]:
        """``(file path, byte offset, blob bytes)`` of one expert's full blob."""
        entry = self.layer(layer)
        if not 0 <= expert < entry.num_experts:
            raise CheckpointError(
                f"layer {layer} has {entry.num_experts} experts; expert {expert} does not exist"
            )
        _, offsets = self._file(entry.file)
        name = expert_tensor_name(layer, expert)
        path = self.model_dir / EXPERTS_DIR / entry.file
        if name not in offsets:
            raise CheckpointError(f"{path}: tensor {name} is missing")
        offset, nbytes = offsets[name]
        if nbytes != entry.layout.blob_nbytes:
            raise CheckpointError(
                f"{path}: tensor {name} has {nbytes} bytes, the layout needs "
                f"{entry.layout.blob_nbytes}"
            )
        return str(path), offset, nbytes

    def read_sections(
        self, layer: int, expert: int, first: int, last: int, read: FileRead | None = None
    ) -> torch.Tensor:
        """Bytes of sections ``first .. last`` (inclusive) of an expert, verified.

        ``read(file, offset, length)`` reads from the layer's blob file (by name); by default a
        positional read of this checkpoint's own descriptor (the offload store passes its own).
        """
        entry = self.layer(layer)
        path, offset, _ = self.expert_extent(layer, expert)
        start, end = entry.layout.section_range(first)[0], entry.layout.section_range(last)[1]
        try:
            if read is None:
                data = read_buffered(self._file(entry.file)[0], offset + start, end - start)
            else:
                data = read(entry.file, offset + start, end - start)
        except OSError as e:
            raise CheckpointError(f"{path}: reading layer {layer} expert {expert} failed ({e})") from e
        self.verify_sections(layer, expert, first, last, data)
        return torch.frombuffer(data, dtype=torch.uint8)

    def verify_sections(self, layer: int, expert: int, first: int, last: int, data) -> None:
        """Check ``data``, the bytes of sections ``first .. last`` of an expert, against the index."""
        entry = self.layer(layer)
        path = self.model_dir / EXPERTS_DIR / entry.file
        start, end = entry.layout.section_range(first)[0], entry.layout.section_range(last)[1]
        if len(data) != end - start:
            raise CheckpointError(
                f"{path}: layer {layer} expert {expert} is truncated "
                f"(read {len(data)} of {end - start} bytes)"
            )
        for s in range(first, last + 1):
            lo, hi = (x - start for x in entry.layout.section_range(s))
            if _crc(memoryview(data)[lo:hi]) != entry.crc32[expert][s]:
                raise CheckpointError(
                    f"{path}: checksum mismatch in layer {layer} expert {expert} section {s} "
                    f"({'base' if s == 0 else f'residual plane {s}'}); the file is corrupt"
                )

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
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        if hasattr(self, "_fds"):
            self.close()
