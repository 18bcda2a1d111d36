"""``d2moe convert SRC DST``: a Hugging Face MoE checkpoint to a d2moe (MWQ) checkpoint.

Every routed expert's ``gate_up`` (``cat([gate, up])``, ``[2I, H]``) and ``down``
(``[H, I]``) are quantized (:func:`quantize_float32`, byte-identical to the float64
reference) and written layer by layer (:func:`vllm_d2moe.mwq.checkpoint.layer_file`); every dense
tensor is copied byte for byte, with its name and dtype, into a safetensors file named
like its source shard. ``config.json`` gains the ``quantization_config`` and the
tokenizer and other small files are copied.

Before anything is written, the headers of all source files are checked against each
other, the file sizes and config.json: a missing shard, a truncated file, a tensor
outside its file or a misshapen tensor is refused naming the file and the tensor.

Speed and memory: the experts of a layer are quantized by a pool of worker threads (one
per core, torch single-threaded in each) while the main thread writes finished experts
in order; sources are memory-mapped, read ahead a layer at a time and dropped from
memory once their layer is written, so memory stays at a few experts whatever the depth.

Resuming: DST is built in ``.DST.d2moe-partial`` next to it and renamed into place when
complete. A layer's file is written under a temporary name, synced, renamed, and only
then recorded in ``progress.json``, so an interrupted run (Ctrl-C, SIGTERM, even a
kill) leaves only finished layers recorded; running the same command again continues
from them. Any other failure, or a run for another source or options, discards it.
"""

import hashlib
import json
import mmap
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_d2moe.converters.architectures import (
    FUSED_PROJECTIONS,
    PER_EXPERT_PROJECTIONS,
    Architecture,
    ConversionError,
    architecture,
)
from vllm_d2moe.converters.calibration import (
    DEFAULT_TOKENS,
    CalibrationText,
    ExpertInputs,
    LayerStatistics,
    calibration_tokens,
)
from vllm_d2moe.converters.output_dir import OutputDirectory, partial_path
from vllm_d2moe.mwq.calibrate import calibrated_quantize
from vllm_d2moe.mwq.checkpoint import (
    EXPERTS_DIR,
    FORMAT_VERSION,
    CheckpointError,
    expert_tensor_name,
    layer_file,
    read_safetensors_header,
    safetensors_header,
    section_checksums,
    write_index,
)
from vllm_d2moe.mwq.layout import ExpertLayout
from vllm_d2moe.mwq.quantize import MWQError, MWQSpec, MWQTensor, quantize, quantize_float32

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
PROGRESS_FILE = "progress.json"
# Files never copied to DST: weights in any format and their indexes.
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
)
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
TORCH_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
# Bytes per element of every safetensors dtype, to check each tensor's extent.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
COPY_CHUNK = 64 << 20
PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class SourceTensor:
    """A tensor in a source safetensors file, located from the file header."""

    name: str
    file: str
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class MatrixPart:
    """A 2-D slice of the source: a whole tensor, or expert ``index`` of a fused 3-D tensor."""

    tensor: SourceTensor
    index: int | None = None

    def __str__(self) -> str:
        return self.tensor.name if self.index is None else f"{self.tensor.name}[{self.index}]"


@dataclass(frozen=True)
class ExpertSource:
    """Where one expert's gate_up (parts stacked by rows) and down matrices come from."""

    gate_up: tuple[MatrixPart, ...]
    down: MatrixPart

    @property
    def parts(self) -> tuple[MatrixPart, ...]:
        return (*self.gate_up, self.down)


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        return read_safetensors_header(path)
    except CheckpointError as e:
        raise ConversionError(str(e)) from e


def _source_files(src: Path) -> tuple[list[str], bool, dict[str, str]]:
    """The safetensors files holding the weights, whether they are sharded, and the
    index's tensor -> file map (empty for a single file)."""
    if (src / SHARD_INDEX).is_file():
        try:
            weight_map = json.loads((src / SHARD_INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConversionError(f"{src / SHARD_INDEX}: not a shard index ({e})") from e
        files = sorted(set(weight_map.values()))
        for file in files:
            if not (src / file).is_file():
                names = sorted(n for n, f in weight_map.items() if f == file)
                raise ConversionError(
                    f"{src / file} is missing: {SHARD_INDEX} puts {len(names)} tensors in it "
                    f"(e.g. {names[0]})"
                )
        return files, True, weight_map
    if (src / SINGLE_FILE).is_file():
        return [SINGLE_FILE], False, {}
    found = sorted(p.name for p in src.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    raise ConversionError(
        f"{src} has no safetensors weights ({SINGLE_FILE} or {SHARD_INDEX}); "
        f"found {found or 'no weight files'}. Save the model with safe_serialization first."
    )


def _read_tensors(
    src: Path, files: list[str], weight_map: dict[str, str]
) -> tuple[dict[str, SourceTensor], dict[str, dict]]:
    """All tensors of the source by name, and each file's ``__metadata__``; every tensor's
    extent is checked against its dtype, its shape and its file's size."""
    tensors, metadata = {}, {}
    for file in files:
        path = src / file
        header, data_start = _read_header(path)
        size = path.stat().st_size
        metadata[file] = header.pop("__metadata__", None)
        for name, meta in header.items():
            try:
                begin, end = meta["data_offsets"]
                dtype, shape = meta["dtype"], tuple(meta["shape"])
            except (KeyError, TypeError, ValueError) as e:
                raise ConversionError(
                    f"{path}: tensor {name} has a malformed header entry ({e})"
                ) from e
            need = DTYPE_SIZES.get(dtype, 0) * int(torch.Size(shape).numel())
            if dtype in DTYPE_SIZES and end - begin != need:
                raise ConversionError(
                    f"{path}: tensor {name} ({dtype} {list(shape)}) needs {need} bytes, "
                    f"its header gives it {end - begin}"
                )
            if not 0 <= begin <= end or data_start + end > size:
                raise ConversionError(
                    f"{path} is truncated or corrupt: tensor {name} lies at bytes "
                    f"[{data_start + begin}, {data_start + end}) of a {size}-byte file"
                )
            if name in tensors:
                raise ConversionError(f"tensor {name} is in both {tensors[name].file} and {file}")
            tensors[name] = SourceTensor(name, file, dtype, shape, data_start + begin, end - begin)
    for name, file in weight_map.items():
        if name not in tensors or tensors[name].file != file:
            found = f"it is in {tensors[name].file}" if name in tensors else "no file holds it"
            raise ConversionError(f"{SHARD_INDEX} puts tensor {name} in {file}, but {found}")
    return tensors, metadata


# Dense tensors whose shape follows from config.json in every supported architecture.
DENSE_SHAPES = {
    "model.embed_tokens.weight": lambda c: (c["vocab_size"], c["hidden_size"]),
    "lm_head.weight": lambda c: (c["vocab_size"], c["hidden_size"]),
    "model.norm.weight": lambda c: (c["hidden_size"],),
}
LAYER_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight")


def _check_dense_shapes(config: dict, tensors: dict[str, SourceTensor]) -> None:
    for name, t in tensors.items():
        if name in DENSE_SHAPES:
            expected = DENSE_SHAPES[name](config)
        elif name.startswith("model.layers.") and name.endswith(LAYER_NORMS):
            expected = (config["hidden_size"],)
        else:
            continue
        if t.shape != expected:
            raise ConversionError(
                f"tensor {name} in {t.file} has shape {list(t.shape)}; config.json "
                f"(vocab_size, hidden_size) implies {list(expected)}"
            )


class ExpertPlan:
    """Validated sources of every routed expert of a checkpoint, by MoE layer.

    Planning reads only headers, so a missing or misshapen expert tensor is
    reported before any work is done.
    """

    def __init__(self, arch: Architecture, config: dict, tensors: dict[str, SourceTensor]):
        self.arch = arch
        self.config = config
        self.tensors = tensors
        self.num_experts = n = arch.num_experts(config)
        hidden, inter = config["hidden_size"], arch.intermediate_size(config)
        self.per_expert_shapes = {
            "gate": (inter, hidden),
            "up": (inter, hidden),
            "down": (hidden, inter),
        }
        self.fused_shapes = {"gate_up": (n, 2 * inter, hidden), "down": (n, hidden, inter)}
        self.layers = {layer: self._plan_layer(layer) for layer in arch.moe_layers(config)}
        self.expert_tensors = {
            part.tensor.name: part.tensor
            for experts in self.layers.values()
            for expert in experts
            for part in (*expert.gate_up, expert.down)
        }
        self._reject_unplanned_experts()

    def _tensor(self, name: str, shape: tuple[int, ...], what: str) -> SourceTensor:
        tensor = self.tensors.get(name)
        if tensor is None:
            raise ConversionError(f"expert tensor {name} ({what}) is missing from the checkpoint")
        if tensor.shape != shape:
            raise ConversionError(
                f"expert tensor {name} in {tensor.file} ({what}) has shape {list(tensor.shape)}; "
                f"the config (hidden_size, {self.arch.intermediate_key}, number of experts) "
                f"implies {list(shape)}"
            )
        if tensor.dtype not in FLOAT_DTYPES:
            raise ConversionError(
                f"expert tensor {name} in {tensor.file} has dtype {tensor.dtype}; only unquantized "
                f"float checkpoints ({', '.join(FLOAT_DTYPES)}) can be converted"
            )
        return tensor

    def _plan_layer(self, layer: int) -> list[ExpertSource]:
        arch = self.arch
        if any(arch.fused_name(layer, p) in self.tensors for p in FUSED_PROJECTIONS):
            fused = {
                p: self._tensor(
                    arch.fused_name(layer, p),
                    self.fused_shapes[p],
                    f"layer {layer}, fused {p} projection",
                )
                for p in FUSED_PROJECTIONS
            }
            return [
                ExpertSource((MatrixPart(fused["gate_up"], e),), MatrixPart(fused["down"], e))
                for e in range(self.num_experts)
            ]
        experts = []
        for e in range(self.num_experts):
            part = {
                p: MatrixPart(
                    self._tensor(
                        arch.per_expert_name(layer, e, p),
                        self.per_expert_shapes[p],
                        f"layer {layer}, expert {e}, {p} projection",
                    )
                )
                for p in PER_EXPERT_PROJECTIONS
            }
            experts.append(ExpertSource((part["gate"], part["up"]), part["down"]))
        return experts

    def _reject_unplanned_experts(self) -> None:
        num_layers = self.config["num_hidden_layers"]
        for name in sorted(self.tensors):
            ref = self.arch.classify(name)
            # Layers past num_hidden_layers (DeepSeek-V3's multi-token-prediction
            # layer) are not part of the decoder stack and stay dense.
            if ref is not None and ref.layer < num_layers and name not in self.expert_tensors:
                raise ConversionError(
                    f"expert tensor {name} does not fit the config: {self.num_experts} experts "
                    f"in MoE layers {list(self.layers)}, "
                    f"either all per expert or all fused per layer"
                )

    def dense_tensors(self) -> list[SourceTensor]:
        return [t for name, t in self.tensors.items() if name not in self.expert_tensors]


class SourceFiles:
    """The source safetensors files, memory-mapped: tensors are zero-copy views, read
    ahead (``will_need``) and dropped from memory (``release``) a layer at a time."""

    def __init__(self, src: Path, files: list[str]):
        self.maps: dict[str, mmap.mmap] = {}
        self.fds: dict[str, int] = {}
        for file in files:
            fd = os.open(src / file, os.O_RDONLY)
            self.fds[file] = fd
            # Copy-on-write (never written) so torch gets a writable buffer.
            self.maps[file] = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)

    def matrix(self, part: MatrixPart) -> torch.Tensor:
        t = part.tensor
        dtype = TORCH_DTYPES[t.dtype]
        full = torch.frombuffer(
            self.maps[t.file], dtype=dtype, count=t.nbytes // dtype.itemsize, offset=t.start
        )
        full = full.view(t.shape)
        return full if part.index is None else full[part.index]

    @staticmethod
    def _pages(tensors) -> dict[str, list[tuple[int, int]]]:
        by_file: dict[str, list[tuple[int, int]]] = {}
        for t in tensors:
            start = t.start // PAGE * PAGE
            by_file.setdefault(t.file, []).append((start, t.start + t.nbytes - start))
        return by_file

    def will_need(self, tensors) -> None:
        for file, ranges in self._pages(tensors).items():
            for start, length in ranges:
                self.maps[file].madvise(mmap.MADV_WILLNEED, start, length)

    def release(self, tensors) -> None:
        """Unmap the pages of ``tensors`` from this process and drop them from the page cache."""
        for file, ranges in self._pages(tensors).items():
            for start, length in ranges:
                self.maps[file].madvise(mmap.MADV_DONTNEED, start, length)
                os.posix_fadvise(self.fds[file], start, length, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        for mapping in self.maps.values():
            try:
                mapping.close()
            except BufferError:  # a tensor still views it; the mapping goes with the tensor
                pass
        for fd in self.fds.values():
            os.close(fd)


def _quantize_expert(
    source: SourceFiles, expert: ExpertSource, spec: MWQSpec, layout: ExpertLayout, quantizers: dict
) -> tuple[torch.Tensor, list[int]]:
    """One expert's blob and its section checksums; ``quantizers`` by projection."""
    gate_up = torch.cat([source.matrix(part) for part in expert.gate_up])
    tensors = {
        "gate_up": quantizers["gate_up"](gate_up, spec, name=" + ".join(map(str, expert.gate_up))),
        "down": quantizers["down"](source.matrix(expert.down), spec, name=str(expert.down)),
    }
    blob = layout.encode(tensors)
    return blob, section_checksums(layout, blob)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomically(path: Path, write) -> None:
    """``write(file)`` into ``path.tmp``, synced, then renamed to ``path``: ``path`` is
    either absent or complete."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


class _Progress:
    """A tqdm bar in expert parameters, with the bytes read and written beside it."""

    def __init__(self, total_params: int, enabled: bool):
        self.bar = tqdm(
            total=total_params,
            unit="param",
            unit_scale=True,
            desc="d2moe convert",
            disable=not enabled,
        )
        self.read = self.written = 0

    def update(self, params: int, read: int, written: int, layer: str) -> None:
        self.read += read
        self.written += written
        self.bar.set_postfix_str(
            f"layer {layer}, read {self.read / 1e9:.2f} GB, wrote {self.written / 1e9:.2f} GB",
            refresh=False,
        )
        self.bar.update(params)

    def close(self) -> None:
        self.bar.close()


def _convert_layer(
    pool: ThreadPoolExecutor,
    source: SourceFiles,
    experts: list[ExpertSource],
    layer: int,
    spec: MWQSpec,
    out: Path,
    window: int,
    progress: _Progress,
    quantizers,
) -> dict:
    """Quantize and write one MoE layer; return its entry of the d2moe index.
    ``quantizers(expert index)``: that expert's quantizer per projection."""
    hidden, intermediate = experts[0].down.tensor.shape[-2:]
    layout = ExpertLayout(spec, hidden, intermediate)
    file = layer_file(layer)
    entries = [
        (expert_tensor_name(layer, e), "U8", [layout.blob_nbytes], layout.blob_nbytes)
        for e in range(len(experts))
    ]
    crcs = []

    def write(f) -> None:
        f.write(safetensors_header(entries, None))
        pending = deque()
        for e, expert in enumerate(experts):
            pending.append(
                (expert, pool.submit(_quantize_expert, source, expert, spec, layout, quantizers(e)))
            )
            if len(pending) >= window:
                _write_expert(f, *pending.popleft())
        while pending:
            _write_expert(f, *pending.popleft())

    def _write_expert(f, expert: ExpertSource, future) -> None:
        blob, checksums = future.result()
        f.write(blob.numpy().data)
        crcs.append(checksums)
        params = sum(_numel(p) for p in expert.parts)
        read = sum(_numel(p) * DTYPE_SIZES[p.tensor.dtype] for p in expert.parts)
        progress.update(params, read, blob.numel(), f"{layer}")

    _write_atomically(out / EXPERTS_DIR / file, write)
    return {
        "hidden": hidden,
        "intermediate": intermediate,
        "num_experts": len(experts),
        "file": file,
        "crc32": crcs,
    }


def _numel(part: MatrixPart) -> int:
    shape = part.tensor.shape if part.index is None else part.tensor.shape[1:]
    return int(torch.Size(shape).numel())


def _copy_tensors(
    src_file: Path, dst_file: Path, tensors: list[SourceTensor], metadata: dict | None
) -> None:
    """Write ``tensors`` as a safetensors file, copying their bytes from ``src_file`` unchanged."""

    def write(out) -> None:
        out.write(
            safetensors_header(
                [(t.name, t.dtype, list(t.shape), t.nbytes) for t in tensors], metadata
            )
        )
        with open(src_file, "rb") as inp:
            for t in tensors:
                inp.seek(t.start)
                left = t.nbytes
                while left:
                    chunk = inp.read(min(left, COPY_CHUNK))
                    if not chunk:
                        raise ConversionError(f"{src_file}: tensor {t.name} is truncated")
                    out.write(chunk)
                    left -= len(chunk)

    _write_atomically(dst_file, write)


def _copy_small_files(src: Path, out: Path) -> None:
    """Tokenizer, generation config, chat template, README, ...: every top-level non-weight file."""
    for path in src.iterdir():
        skip = (
            not path.is_file()
            or path.name.startswith(".")
            or path.name == "config.json"
            or path.name.endswith(".index.json")
            or path.suffix in WEIGHT_SUFFIXES
        )
        if not skip:
            shutil.copy2(path, out / path.name)


def _read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"{src} is not a Hugging Face model directory: {path} is missing")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method")
        raise ConversionError(
            f"{src} is already quantized (quant_method {method!r}); "
            "convert an unquantized checkpoint"
        )
    return config


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    a, b = src.resolve(), dst.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise ConversionError(
            f"destination {dst} overlaps the source {src}; choose another directory"
        )
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} already exists; pass --overwrite to replace it")


@dataclass
class _Plan:
    """Everything checked about a source before a byte is written."""

    src: Path
    config: dict
    arch: Architecture
    files: list[str]
    sharded: bool
    tensors: dict[str, SourceTensor]
    metadata: dict[str, dict]
    experts: "ExpertPlan"

    def fingerprint(self, spec: MWQSpec, calibration: "CalibrationText | None") -> dict:
        """What a partial conversion must match to be continued."""
        return {
            "format_version": FORMAT_VERSION,
            "source": str(self.src.resolve()),
            "config_sha256": hashlib.sha256((self.src / "config.json").read_bytes()).hexdigest(),
            "files": {
                f: [(self.src / f).stat().st_size, (self.src / f).stat().st_mtime_ns]
                for f in self.files
            },
            "spec": [spec.min_bits, spec.max_bits, spec.group_size],
            "calibration": calibration.fingerprint() if calibration else None,
        }


def plan_conversion(src) -> _Plan:
    """Read and check the source's config, index and headers; raise ConversionError naming
    the file and tensor at fault."""
    src = Path(src)
    config = _read_config(src)
    arch = architecture(config.get("model_type"))
    files, sharded, weight_map = _source_files(src)
    tensors, metadata = _read_tensors(src, files, weight_map)
    experts = ExpertPlan(arch, config, tensors)
    _check_dense_shapes(config, tensors)
    return _Plan(src, config, arch, files, sharded, tensors, metadata, experts)


def _load_progress(work: OutputDirectory, fingerprint: dict) -> dict:
    """The finished parts recorded in a partial conversion of the same source and options,
    or a fresh record (the partial directory emptied) when there is none or it differs."""
    fresh = {"fingerprint": fingerprint, "dense": False, "layers": {}, "sizes": {}}
    if not work.resumed:
        return fresh
    try:
        progress = json.loads((work.path / PROGRESS_FILE).read_text())
        same = progress["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError, TypeError):
        same = False
    if not same:
        print(
            f"d2moe convert: {work.path} holds a conversion of another source or options; "
            "starting over",
            file=sys.stderr,
        )
        work.discard()
        return fresh
    for layer, entry in list(progress["layers"].items()):
        path = work.path / EXPERTS_DIR / entry["file"]
        if not path.is_file() or path.stat().st_size != progress["sizes"].get(layer):
            del progress["layers"][layer]  # changed since: redo it
    return progress


def _save_progress(work: OutputDirectory, progress: dict) -> None:
    _write_atomically(work.path / PROGRESS_FILE, lambda f: f.write(json.dumps(progress).encode()))


def _build(
    plan: _Plan,
    work: OutputDirectory,
    spec: MWQSpec,
    workers: int,
    show_progress: bool,
    quantizer,
    calibration: "CalibrationText | None" = None,
) -> dict:
    """Write everything into ``work.path``; return the counts of this run (layers
    converted, layers already done, expert parameters quantized, experts left
    uncalibrated per layer)."""
    out = work.path
    progress = _load_progress(work, plan.fingerprint(spec, calibration))
    progress.setdefault("uncalibrated", {})
    (out / EXPERTS_DIR).mkdir(exist_ok=True)
    if not progress["dense"]:
        by_file: dict[str, list[SourceTensor]] = {}
        for t in sorted(plan.experts.dense_tensors(), key=lambda t: (t.file, t.start)):
            by_file.setdefault(t.file, []).append(t)
        for file, tensors in by_file.items():
            _copy_tensors(plan.src / file, out / file, tensors, plan.metadata[file])
        if plan.sharded:
            index = {
                "metadata": {"total_size": sum(t.nbytes for ts in by_file.values() for t in ts)},
                "weight_map": {t.name: t.file for ts in by_file.values() for t in ts},
            }
            (out / SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        progress["dense"] = True
        _save_progress(work, progress)

    todo = {
        layer: experts
        for layer, experts in plan.experts.layers.items()
        if str(layer) not in progress["layers"]
    }
    counts = {
        "layers_done_before": len(plan.experts.layers) - len(todo),
        "layers_converted": 0,
        "expert_params": 0,
    }
    total_params = sum(_numel(p) for experts in todo.values() for e in experts for p in e.parts)
    bar = _Progress(total_params, show_progress)
    source = SourceFiles(plan.src, plan.files)
    threads = torch.get_num_threads()
    # One single-threaded torch per worker: blocks are too small to split well across cores.
    torch.set_num_threads(1 if workers > 1 else threads)
    try:
        inputs = ExpertInputs(plan, source, calibration.tokens) if calibration and todo else None
        with ThreadPoolExecutor(workers, thread_name_prefix="d2moe-convert") as pool:
            try:
                for i, layer in enumerate(todo):
                    following = list(todo)[i + 1 : i + 2]
                    if following:  # read ahead while this layer computes
                        source.will_need({p.tensor for e in todo[following[0]] for p in e.parts})
                    experts = todo[layer]
                    quantizers = partial(_same_quantizer, quantizer)
                    if inputs is not None:
                        torch.set_num_threads(threads)  # the source model's layers: all cores
                        statistics = inputs.layer(layer)
                        torch.set_num_threads(1 if workers > 1 else threads)
                        fitted = _fit_calibrated(pool, source, experts, statistics, spec, layer)
                        quantizers = partial(_calibrated_quantizers, fitted, quantizer)
                        progress["uncalibrated"][str(layer)] = _uncalibrated(statistics, layer)
                    try:
                        entry = _convert_layer(
                            pool, source, experts, layer, spec, out, 2 * workers + 1, bar, quantizers
                        )
                    finally:
                        source.release({p.tensor for e in experts for p in e.parts})
                    progress["layers"][str(layer)] = entry
                    progress["sizes"][str(layer)] = (
                        (out / EXPERTS_DIR / entry["file"]).stat().st_size
                    )
                    _save_progress(work, progress)
                    counts["layers_converted"] += 1
            except BaseException:
                pool.shutdown(cancel_futures=True)  # a failed layer's queued experts
                raise
        counts["expert_params"] = total_params
        counts["uncalibrated_experts"] = {
            int(k): v for k, v in progress["uncalibrated"].items() if v
        }
    finally:
        torch.set_num_threads(threads)
        bar.close()
        source.close()

    expert_dtypes = sorted({FLOAT_DTYPES[t.dtype] for t in plan.experts.expert_tensors.values()})
    source_record = {
        "model_type": plan.arch.model_type,
        "path": str(plan.src.resolve()),
        "dtype": ", ".join(expert_dtypes),
    }
    if calibration:
        source_record["calibration"] = {
            "tokens": int(calibration.tokens.numel()),
            "text": calibration.origin,
            "uncalibrated_experts": counts["uncalibrated_experts"],
        }
    config = dict(plan.config)
    config["quantization_config"] = write_index(
        out, spec, {int(k): v for k, v in progress["layers"].items()}, source_record
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_small_files(plan.src, out)
    (out / PROGRESS_FILE).unlink()
    return counts


def _same_quantizer(quantizer, expert: int) -> dict:
    return {"gate_up": quantizer, "down": quantizer}


# Experts fitted in one batched sweep: its per-column work is a few small torch calls, whose
# overhead a batch shares; memory grows with it (about 200 MB per expert at OLMoE's size).
CALIBRATION_BATCH = 4


def _fit_experts(
    source: SourceFiles, experts: list[ExpertSource], statistics: LayerStatistics, indices: list[int],
    spec: MWQSpec, layer: int,
) -> list[dict]:
    """The calibrated tensors, by projection, of the experts ``indices`` of a layer."""
    gate_up = torch.stack([torch.cat([source.matrix(p) for p in experts[e].gate_up]) for e in indices])
    down = torch.stack([source.matrix(experts[e].down) for e in indices])
    name = f"layer {layer}, experts {indices}"
    fitted_up = calibrated_quantize(gate_up, statistics.gate_up[indices], spec, f"{name}, gate_up")
    fitted_down = calibrated_quantize(down, statistics.down[indices], spec, f"{name}, down")
    return [{"gate_up": u, "down": d} for u, d in zip(fitted_up, fitted_down)]


def _fit_calibrated(
    pool: ThreadPoolExecutor, source: SourceFiles, experts: list[ExpertSource],
    statistics: LayerStatistics, spec: MWQSpec, layer: int,
) -> list[dict | None]:
    """Per expert of a layer its calibrated tensors by projection; None for an expert no
    calibration token reached."""
    reached = [e for e in range(len(experts)) if statistics.tokens[e] > 0]
    batches = [reached[i : i + CALIBRATION_BATCH] for i in range(0, len(reached), CALIBRATION_BATCH)]
    futures = [pool.submit(_fit_experts, source, experts, statistics, b, spec, layer) for b in batches]
    fitted: list[dict | None] = [None] * len(experts)
    for batch, future in zip(batches, futures):
        for e, tensors in zip(batch, future.result()):
            fitted[e] = tensors
    return fitted


def _fitted(tensor: MWQTensor, weight: torch.Tensor, spec: MWQSpec, name: str) -> MWQTensor:
    return tensor


def _calibrated_quantizers(fitted: list[dict | None], fallback, expert: int) -> dict:
    """Expert ``expert``'s already fitted tensors; ``fallback`` (the uncalibrated fit) for an
    expert no calibration token reached."""
    if fitted[expert] is None:
        return _same_quantizer(fallback, expert)
    return {proj: partial(_fitted, tensor) for proj, tensor in fitted[expert].items()}


def _uncalibrated(statistics: LayerStatistics, layer: int) -> list[int]:
    """The experts no calibration token reached (said on stderr as it happens)."""
    missed = [e for e, n in enumerate(statistics.tokens.tolist()) if n == 0]
    if missed:
        print(
            f"d2moe convert: layer {layer}: no calibration token was routed to expert(s) "
            f"{missed}; they use the uncalibrated fit",
            file=sys.stderr,
        )
    return missed


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def convert(
    src,
    dst,
    spec: MWQSpec,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    counts: dict | None = None,
    reference: bool = False,
    calibration_tokens_requested: int | None = None,
    calibration_text: list[Path] | None = None,
) -> Path:
    """Convert the HF checkpoint directory ``src`` into the d2moe checkpoint ``dst``.

    ``reference`` quantizes with the float64 reference quantizer (same bytes, several
    times slower: for comparisons). ``calibration_tokens_requested`` (with
    ``calibration_text`` files, default the reference corpus) fits every width to the
    experts' inputs (:mod:`vllm_d2moe.mwq.calibrate`); the text is checked before any work.

    Raises :class:`ConversionError` (or ``MWQError`` for a group size that does not
    divide a weight) naming the offending tensor or file; on any failure ``dst`` is left
    as it was. An interruption (KeyboardInterrupt, SIGTERM) keeps the finished layers in
    ``partial_path(dst)`` for the next call with the same arguments to continue;
    ``counts``, when given, receives how many layers this call converted and found done.
    """
    src, dst = Path(src), Path(dst)
    _check_destination(src, dst, overwrite)
    plan = plan_conversion(src)
    for experts in plan.experts.layers.values():  # the group size must divide every width
        first = experts[0]
        spec.num_groups(first.gate_up[0].tensor.shape[-1], str(first.gate_up[0]))
        spec.num_groups(first.down.tensor.shape[-1], str(first.down))
    workers = workers or default_workers()
    calibration = None
    if calibration_tokens_requested is not None or calibration_text:
        calibration = calibration_tokens(
            plan.src,
            plan.config["vocab_size"],
            calibration_tokens_requested or DEFAULT_TOKENS,
            calibration_text,
        )
    with OutputDirectory(dst, overwrite=overwrite, resumable=True) as work:
        done = _build(
            plan,
            work,
            spec,
            workers,
            progress,
            quantize if reference else quantize_float32,
            calibration,
        )
        work.commit()
    if counts is not None:
        counts.update(done)
    return dst


def add_arguments(parser) -> None:
    defaults = MWQSpec()
    parser.add_argument("src", type=Path, help="Hugging Face model directory (safetensors)")
    parser.add_argument("dst", type=Path, help="output directory for the d2moe checkpoint")
    parser.add_argument(
        "--min-bits", type=int, default=defaults.min_bits, help="smallest width (base bits)"
    )
    parser.add_argument("--max-bits", type=int, default=defaults.max_bits, help="largest width")
    parser.add_argument(
        "--group-size", type=int, default=defaults.group_size, help="columns per scale group"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="quantizing threads (default: one per available core)",
    )
    parser.add_argument(
        "--reference-float64",
        action="store_true",
        help="quantize with the float64 reference (same output, several times slower)",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="fit every width to the experts' inputs on calibration text (GPTQ-style; "
        "default: round-to-nearest)",
    )
    parser.add_argument(
        "--calibration-tokens",
        type=int,
        default=None,
        help=f"calibration tokens (default {DEFAULT_TOKENS}; implies --calibrate)",
    )
    parser.add_argument(
        "--calibration-text",
        type=Path,
        nargs="+",
        default=None,
        help="text files or JSON lines ('text' or 'input_ids' per line) to calibrate on "
        "(default: the reference corpus's train split; implies --calibrate)",
    )


def run(args) -> int:
    start = time.perf_counter()
    if args.workers is not None and args.workers < 1:
        print(
            f"d2moe convert: error: --workers must be at least 1, got {args.workers}",
            file=sys.stderr,
        )
        return 2
    counts: dict = {}
    try:
        spec = MWQSpec(args.min_bits, args.max_bits, args.group_size)
        dst = convert(
            args.src,
            args.dst,
            spec,
            overwrite=args.overwrite,
            workers=args.workers,
            counts=counts,
            reference=args.reference_float64,
            calibration_tokens_requested=(
                args.calibration_tokens or (DEFAULT_TOKENS if args.calibrate else None)
            ),
            calibration_text=args.calibration_text,
        )
    except (ConversionError, MWQError, CheckpointError, OSError) as e:
        print(f"d2moe convert: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        partial = partial_path(Path(args.dst))
        try:
            done = len(json.loads((partial / PROGRESS_FILE).read_text())["layers"])
        except (OSError, ValueError, KeyError):
            done = 0
        print(
            f"d2moe convert: interrupted ({e or 'Ctrl-C'}); {done} finished MoE layer(s) are kept "
            f"in {partial}: run the same command again to continue",
            file=sys.stderr,
        )
        return 130
    elapsed = time.perf_counter() - start
    print(
        f"wrote {dst} (widths {spec.min_bits}-{spec.max_bits} bits, group size {spec.group_size}): "
        f"{counts['layers_converted']} MoE layers converted"
        + (
            f", {counts['layers_done_before']} continued from an earlier run"
            if counts["layers_done_before"]
            else ""
        )
        + f", {counts['expert_params'] / 1e6:.0f}M expert parameters in {elapsed:.1f} s"
    )
    for layer, experts in sorted(counts.get("uncalibrated_experts", {}).items()):
        print(f"layer {layer}: expert(s) {experts} had no calibration token: uncalibrated fit")
    return 0
