"""``d2moe convert SRC DST``: a Hugging Face MoE checkpoint to a d2moe (MWQ) checkpoint.

The source is read tensor by tensor, so peak memory is about one MoE layer's
experts, not the model. Per MoE layer every expert's ``gate_up``
(``cat([gate, up])``, ``[2I, H]``) and ``down`` (``[H, I]``) are quantized and
written with :class:`CheckpointWriter`; every dense tensor is copied byte for
byte, with its name and dtype, into a safetensors file named like its source
shard. ``config.json`` gains the ``quantization_config`` and the tokenizer and
other small files are copied. DST is built in a temporary directory next to it
and renamed into place only when complete.
"""

import json
import shutil
import struct
import sys
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from vllm_d2moe.converters.architectures import (
    FUSED_PROJECTIONS,
    PER_EXPERT_PROJECTIONS,
    Architecture,
    ConversionError,
    architecture,
)
from vllm_d2moe.mwq.checkpoint import CheckpointError, CheckpointWriter, read_safetensors_header
from vllm_d2moe.mwq.quantize import MWQError, MWQSpec, quantize

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
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
COPY_CHUNK = 64 << 20


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


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        return read_safetensors_header(path)
    except CheckpointError as e:
        raise ConversionError(str(e)) from e


def _source_files(src: Path) -> tuple[list[str], bool]:
    """The safetensors files holding the weights, and whether they are sharded."""
    if (src / SHARD_INDEX).is_file():
        weight_map = json.loads((src / SHARD_INDEX).read_text())["weight_map"]
        return sorted(set(weight_map.values())), True
    if (src / SINGLE_FILE).is_file():
        return [SINGLE_FILE], False
    found = sorted(p.name for p in src.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    raise ConversionError(
        f"{src} has no safetensors weights ({SINGLE_FILE} or {SHARD_INDEX}); "
        f"found {found or 'no weight files'}. Save the model with safe_serialization first."
    )


def _read_tensors(src: Path, files: list[str]) -> tuple[dict[str, SourceTensor], dict[str, dict]]:
    """All tensors of the source by name, and each file's ``__metadata__``."""
    tensors, metadata = {}, {}
    for file in files:
        header, data_start = _read_header(src / file)
        metadata[file] = header.pop("__metadata__", None)
        for name, meta in header.items():
            begin, end = meta["data_offsets"]
            tensors[name] = SourceTensor(
                name, file, meta["dtype"], tuple(meta["shape"]), data_start + begin, end - begin
            )
    return tensors, metadata


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
                f"expert tensor {name} ({what}) has shape {list(tensor.shape)}; the config "
                f"(hidden_size, {self.arch.intermediate_key}, number of experts) implies {list(shape)}"
            )
        if tensor.dtype not in FLOAT_DTYPES:
            raise ConversionError(
                f"expert tensor {name} has dtype {tensor.dtype}; only unquantized float checkpoints "
                f"({', '.join(FLOAT_DTYPES)}) can be converted"
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


def _load_matrix(handles: dict, part: MatrixPart) -> torch.Tensor:
    """``part`` as a tensor, read through the open ``safe_open`` handle of its file."""
    handle = handles[part.tensor.file]
    if part.index is None:
        return handle.get_tensor(part.tensor.name)
    return handle.get_slice(part.tensor.name)[part.index]  # reads only this expert


def _quantize_layer(handles: dict, experts: list[ExpertSource], spec: MWQSpec) -> list[dict]:
    quantized = []
    for expert in experts:
        gate_up = torch.cat([_load_matrix(handles, part) for part in expert.gate_up])
        quantized.append(
            {
                "gate_up": quantize(gate_up, spec, name=" + ".join(map(str, expert.gate_up))),
                "down": quantize(_load_matrix(handles, expert.down), spec, name=str(expert.down)),
            }
        )
    return quantized


def _copy_tensors(
    src_file: Path, dst_file: Path, tensors: list[SourceTensor], metadata: dict | None
) -> None:
    """Write ``tensors`` as a safetensors file, copying their bytes from ``src_file`` unchanged."""
    header, offset = {}, 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps tensor data 8-byte aligned, as safetensors does
    with open(src_file, "rb") as inp, open(dst_file, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors:
            inp.seek(t.start)
            left = t.nbytes
            while left:
                chunk = inp.read(min(left, COPY_CHUNK))
                if not chunk:
                    raise ConversionError(f"{src_file}: tensor {t.name} is truncated")
                out.write(chunk)
                left -= len(chunk)


def _write_dense(
    src: Path, out: Path, plan: ExpertPlan, metadata: dict, sharded: bool, bar
) -> None:
    by_file: dict[str, list[SourceTensor]] = {}
    for t in sorted(plan.dense_tensors(), key=lambda t: (t.file, t.start)):
        by_file.setdefault(t.file, []).append(t)
    for file, tensors in by_file.items():
        _copy_tensors(src / file, out / file, tensors, metadata[file])
        bar.update(len(tensors))
    if sharded:
        index = {
            "metadata": {"total_size": sum(t.nbytes for ts in by_file.values() for t in ts)},
            "weight_map": {t.name: t.file for ts in by_file.values() for t in ts},
        }
        (out / SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n")


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
    config = json.loads(path.read_text())
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method")
        raise ConversionError(
            f"{src} is already quantized (quant_method {method!r}); convert an unquantized checkpoint"
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


def _sibling(dst: Path, tag: str) -> Path:
    """A hidden, unique path next to ``dst`` (same file system, so renames are atomic)."""
    return dst.with_name(f".{dst.name}.{tag}-{uuid.uuid4().hex[:8]}")


def _move_into_place(tmp: Path, dst: Path) -> None:
    if not dst.exists():
        tmp.rename(dst)
        return
    old = _sibling(dst, "old")
    dst.rename(old)
    tmp.rename(dst)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def _build(src: Path, out: Path, spec: MWQSpec, progress: bool) -> None:
    config = _read_config(src)
    arch = architecture(config.get("model_type"))
    files, sharded = _source_files(src)
    tensors, metadata = _read_tensors(src, files)
    plan = ExpertPlan(arch, config, tensors)
    with tqdm(total=len(tensors), unit="tensor", desc="d2moe convert", disable=not progress) as bar:
        _write_dense(src, out, plan, metadata, sharded, bar)
        writer = CheckpointWriter(out, spec)
        with ExitStack() as stack:
            handles = {f: stack.enter_context(safe_open(str(src / f), "pt")) for f in files}
            for layer, experts in plan.layers.items():
                bar.set_postfix_str(f"layer {layer}")
                writer.write_layer(layer, _quantize_layer(handles, experts, spec))
                bar.update(len({p.tensor.name for e in experts for p in (*e.gate_up, e.down)}))
    expert_dtypes = sorted({FLOAT_DTYPES[t.dtype] for t in plan.expert_tensors.values()})
    source = {
        "model_type": arch.model_type,
        "path": str(src.resolve()),
        "dtype": ", ".join(expert_dtypes),
    }
    config["quantization_config"] = writer.finish(source)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_small_files(src, out)


def convert(src, dst, spec: MWQSpec, overwrite: bool = False, progress: bool = True) -> Path:
    """Convert the HF checkpoint directory ``src`` into the d2moe checkpoint ``dst``.

    Raises :class:`ConversionError` (or ``MWQError`` for a group size that
    does not divide a weight) naming the offending tensor or file; on any
    failure ``dst`` is left as it was.
    """
    src, dst = Path(src), Path(dst)
    _check_destination(src, dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(dst, "tmp")
    tmp.mkdir()
    try:
        _build(src, tmp, spec, progress)
        _move_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def run(args) -> int:
    try:
        spec = MWQSpec(args.min_bits, args.max_bits, args.group_size)
        dst = convert(args.src, args.dst, spec, overwrite=args.overwrite)
    except (ConversionError, MWQError, CheckpointError, OSError) as e:
        print(f"d2moe convert: error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {dst} (widths {spec.min_bits}-{spec.max_bits} bits, group size {spec.group_size})"
    )
    return 0
