"""`d2moe convert` and `d2moe inspect` on tiny random models of every supported architecture."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_d2moe import cli
from vllm_d2moe.converters import convert as convert_module
from vllm_d2moe.converters.architectures import ConversionError, architecture
from vllm_d2moe.converters.convert import convert
from vllm_d2moe.converters.memory_watch import PeakMemory
from vllm_d2moe.converters.output_dir import partial_path
from vllm_d2moe.converters.random_model import write_random_model
from vllm_d2moe.mwq.checkpoint import (
    EXPERTS_DIR,
    CheckpointError,
    MWQCheckpoint,
    read_safetensors_header,
)
from vllm_d2moe.mwq.quantize import MWQError, MWQSpec, dequantize, quantize
from vllm_d2moe.testing.tiny_models import SUPPORTED_TINY_ARCHS, make_tiny_model

SPEC = MWQSpec(min_bits=2, max_bits=8, group_size=64)


def load_all_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def config_of(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of the single-file checkpoint ``src`` whose tensors went through ``edit(dict)``."""
    shutil.copytree(src, dst)
    tensors = load_all_tensors(src)
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """``tiny_source(arch, **kwargs)``: a tiny HF model directory, built once per argument set."""
    cache = {}

    def build(arch: str, **kwargs) -> Path:
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = make_tiny_model(arch, tmp_path_factory.mktemp(arch) / "hf", **kwargs)
        return cache[key]

    return build


@pytest.fixture(scope="module")
def tiny_converted(tiny_source):
    cache = {}

    def build(arch: str) -> Path:
        if arch not in cache:
            src = tiny_source(arch)
            cache[arch] = convert(src, src.parent / "d2moe", SPEC, progress=False)
        return cache[arch]

    return build


@pytest.fixture(scope="module", params=SUPPORTED_TINY_ARCHS)
def arch(request) -> str:
    return request.param


def test_experts_round_trip_at_every_width(arch, tiny_source, tiny_converted):
    src, dst = tiny_source(arch), tiny_converted(arch)
    source, config = load_all_tensors(src), config_of(src)
    desc = architecture(arch)
    ckpt = MWQCheckpoint(dst)
    assert sorted(ckpt.layers) == desc.moe_layers(config)
    for layer, entry in ckpt.layers.items():
        assert entry.num_experts == desc.num_experts(config)
        for expert in range(entry.num_experts):
            weight = {
                p: source[desc.per_expert_name(layer, expert, p)] for p in ("gate", "up", "down")
            }
            expected = {
                "gate_up": quantize(torch.cat([weight["gate"], weight["up"]]), SPEC),
                "down": quantize(weight["down"], SPEC),
            }
            for bits in SPEC.widths:
                stored = ckpt.read_expert(layer, expert, bits)
                for proj, q in expected.items():
                    assert torch.equal(dequantize(stored[proj]), dequantize(q.truncate(bits))), (
                        f"layer {layer} expert {expert} {proj} at {bits} bits"
                    )


def test_dense_tensors_are_byte_identical(arch, tiny_source, tiny_converted):
    src, dst = tiny_source(arch), tiny_converted(arch)
    desc = architecture(arch)
    source = load_all_tensors(src)
    dense = {name: t for name, t in source.items() if desc.classify(name) is None}
    copied = load_all_tensors(dst)
    assert copied.keys() == dense.keys()
    for name, t in dense.items():
        assert copied[name].dtype == t.dtype and copied[name].shape == t.shape, name
        assert raw_bytes(copied[name]) == raw_bytes(t), name


def test_config_and_tokenizer(arch, tiny_source, tiny_converted):
    src, dst = tiny_source(arch), tiny_converted(arch)
    config, source_config = config_of(dst), config_of(src)
    quant = config.pop("quantization_config")
    assert config == source_config
    assert quant["quant_method"] == "d2moe"
    assert (quant["min_bits"], quant["max_bits"], quant["group_size"]) == (2, 8, 64)
    assert MWQCheckpoint(dst).source["model_type"] == arch
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    assert AutoTokenizer.from_pretrained(dst).bos_token == "<s>"


def test_fused_expert_layout_converts_like_per_expert(tiny_source, tiny_converted, tmp_path):
    """transformers 5 can save experts fused ([E, 2I, H] / [E, H, I]); the result must not change."""
    src = tiny_source("mixtral")
    fused = tmp_path / "fused"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(fused, save_original_format=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, fused / name)
    with safe_open(fused / "model.safetensors", "pt") as f:
        assert "model.layers.1.mlp.experts.gate_up_proj" in f.keys()
    dst = convert(fused, tmp_path / "d2moe", SPEC, progress=False)
    reference = tiny_converted("mixtral")
    for entry in MWQCheckpoint(reference).layers.values():
        assert (dst / EXPERTS_DIR / entry.file).read_bytes() == (
            reference / EXPERTS_DIR / entry.file
        ).read_bytes()


def test_sharded_source_keeps_an_index(tiny_source, tmp_path):
    src = tiny_source("qwen3_moe", max_shard_size="200KB")
    assert (src / "model.safetensors.index.json").is_file()
    dst = convert(src, tmp_path / "d2moe", SPEC, progress=False)
    weight_map = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    dense = {n for n in load_all_tensors(src) if architecture("qwen3_moe").classify(n) is None}
    assert weight_map.keys() == dense
    for name, file in weight_map.items():
        with safe_open(dst / file, "pt") as f:
            assert name in f.keys()
    assert MWQCheckpoint(dst).verify() > 0


def test_inspect_prints_layout_and_verifies(tiny_converted, capsys):
    dst = tiny_converted("mixtral")
    assert cli.main(["inspect", str(dst)]) == 0
    out = capsys.readouterr().out
    layout = MWQCheckpoint(dst).layers[0].layout
    assert "layers 0-1: 8 experts, gate_up [512, 128], down [128, 256]" in out
    assert "widths 2-8 bits, group size 64" in out
    for bits in SPEC.widths:
        assert f"{layout.nbytes(bits):,}" in out
        assert f"  {bits} bits: {2 * 8 * layout.nbytes(bits):,}" in out
    # 2 base bits + fp16 scale and zero per 64 weights; +1 bit + a 4-bit scale code per plane.
    assert " 2.500" in out and " 8.875" in out
    assert f"checksums: ok ({2 * 8 * layout.blob_nbytes:,} bytes verified)" in out


def test_corrupt_expert_byte_is_caught(tiny_converted, tmp_path, capsys):
    dst = shutil.copytree(tiny_converted("olmoe"), tmp_path / "corrupt")
    path, offset, _ = MWQCheckpoint(dst).expert_extent(1, 3)
    data = bytearray(Path(path).read_bytes())
    data[offset + 1] ^= 0x10
    Path(path).write_bytes(data)

    ckpt = MWQCheckpoint(dst)
    with pytest.raises(CheckpointError, match=Path(path).name):
        ckpt.verify()
    with pytest.raises(CheckpointError, match="layer 1 expert 3"):
        ckpt.read_expert(1, 3, SPEC.min_bits)
    ckpt.read_expert(1, 2, SPEC.max_bits)  # its neighbours are intact

    assert cli.main(["inspect", str(dst)]) == 1
    assert "checksum mismatch" in capsys.readouterr().err


def test_unsupported_model_type(tiny_source, tmp_path):
    src = shutil.copytree(tiny_source("olmoe"), tmp_path / "llama")
    config = config_of(src)
    config["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ConversionError, match="'llama'.*supported: deepseek_v2, .*mixtral, olmoe, qwen2_moe"
    ):
        convert(src, tmp_path / "out", SPEC, progress=False)


def test_missing_expert_tensor_is_named(tiny_source, tmp_path):
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    src = edited_copy(tiny_source("olmoe"), tmp_path / "src", lambda t: t.pop(name))
    with pytest.raises(ConversionError, match=f"{name} .*missing"):
        convert(src, tmp_path / "out", SPEC, progress=False)
    assert not (tmp_path / "out").exists()


def test_misshapen_and_surplus_expert_tensors_are_named(tiny_source, tmp_path):
    name = "model.layers.0.mlp.experts.2.down_proj.weight"
    src = edited_copy(
        tiny_source("olmoe"),
        tmp_path / "src",
        lambda t: t.update({name: t[name][:, :64].contiguous()}),
    )
    with pytest.raises(ConversionError, match=f"{name} .*shape \\[128, 64\\]"):
        convert(src, tmp_path / "out", SPEC, progress=False)

    surplus = "model.layers.0.mlp.experts.8.gate_proj.weight"
    src = edited_copy(
        tiny_source("olmoe"), tmp_path / "src2", lambda t: t.update({surplus: t[name].clone()})
    )
    with pytest.raises(ConversionError, match=f"{surplus} does not fit the config: 8 experts"):
        convert(src, tmp_path / "out", SPEC, progress=False)


def test_group_size_must_divide_the_weights(tiny_source, tmp_path):
    with pytest.raises(MWQError, match=r"model\.layers\.0\..*group size 48 does not divide"):
        convert(tiny_source("olmoe"), tmp_path / "out", MWQSpec(2, 4, 48), progress=False)


def test_checkpoint_without_safetensors(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (src / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConversionError, match="no safetensors weights.*pytorch_model.bin"):
        convert(src, tmp_path / "out", SPEC, progress=False)


def test_failure_midway_leaves_destination_untouched(tiny_source, tmp_path):
    """A NaN in the last expert fails quantization after the first layer was written."""
    name = "model.layers.1.mlp.experts.7.down_proj.weight"

    def poison(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name][0, 0] = float("nan")

    src = edited_copy(tiny_source("olmoe"), tmp_path / "src", poison)
    out = tmp_path / "outputs"
    out.mkdir()
    with pytest.raises(MWQError, match=f"{name}: contains NaN"):
        convert(src, out / "new", SPEC, progress=False)
    assert list(out.iterdir()) == []

    existing = out / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("previous conversion")
    with pytest.raises(MWQError):
        convert(src, existing, SPEC, overwrite=True, progress=False)
    assert list(out.iterdir()) == [existing]
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_cli_convert_refuses_existing_destination_unless_overwrite(tiny_source, tmp_path, capsys):
    src, dst = tiny_source("olmoe"), tmp_path / "out"
    dst.mkdir()
    args = [
        "convert",
        str(src),
        str(dst),
        "--min-bits",
        "3",
        "--max-bits",
        "4",
        "--group-size",
        "128",
    ]
    assert cli.main(args) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert cli.main([*args, "--overwrite"]) == 0
    assert MWQCheckpoint(dst).spec == MWQSpec(3, 4, 128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- bad input at scale: refused before anything is written -------------------------


def assert_nothing_written(parent: Path, keep: tuple[str, ...] = ("src",)) -> None:
    """No destination and no hidden work folder next to it."""
    assert sorted(p.name for p in parent.iterdir()) == sorted(keep)


def first_expert_tensor(path: Path) -> tuple[str, int, int]:
    """Name and absolute byte range of the expert tensor stored first in a safetensors file."""
    header, start = read_safetensors_header(path)
    header.pop("__metadata__", None)
    name, meta = min(
        ((n, m) for n, m in header.items() if ".experts." in n),
        key=lambda x: x[1]["data_offsets"][0],
    )
    begin, end = meta["data_offsets"]
    return name, start + begin, start + end


def test_missing_shard_is_named(tiny_source, tmp_path):
    src = shutil.copytree(tiny_source("qwen3_moe", max_shard_size="200KB"), tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    shard = sorted(set(index.values()))[1]
    (src / shard).unlink()
    example = sorted(n for n, f in index.items() if f == shard)[0]
    with pytest.raises(
        ConversionError, match=f"{shard} is missing: .* tensors in it \\(e.g. {example}\\)"
    ):
        convert(src, tmp_path / "out", SPEC, progress=False)
    assert_nothing_written(tmp_path)


def test_truncated_shard_is_named(tiny_source, tmp_path, capsys):
    """Cut inside an expert tensor: safetensors itself would raise without the file's name."""
    src = shutil.copytree(tiny_source("olmoe"), tmp_path / "src")
    path = src / "model.safetensors"
    name, begin, end = first_expert_tensor(path)
    with open(path, "r+b") as f:
        f.truncate((begin + end) // 2)
    with pytest.raises(ConversionError, match=f"{path} is truncated or corrupt: tensor .* of a"):
        convert(src, tmp_path / "out", SPEC, progress=False)
    assert cli.main(["convert", str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{path} is truncated" in err and "tensor model.layers." in err
    assert_nothing_written(tmp_path)


def test_tensor_beyond_the_file_is_named(tiny_source, tmp_path):
    """A header whose offsets point past the end of the file (size intact)."""
    src = shutil.copytree(tiny_source("olmoe"), tmp_path / "src")
    path = src / "model.safetensors"
    header, start = read_safetensors_header(path)
    name = "model.layers.1.mlp.experts.4.down_proj.weight"
    size = path.stat().st_size
    header[name]["data_offsets"] = [o + size for o in header[name]["data_offsets"]]
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (start - 8 - len(raw))  # same header length: the data stays in place
    data = path.read_bytes()
    path.write_bytes(data[:8] + raw + data[start:])
    with pytest.raises(
        ConversionError, match=f"{path} is truncated or corrupt: tensor {name} lies at"
    ):
        convert(src, tmp_path / "out", SPEC, progress=False)
    assert_nothing_written(tmp_path)


def test_shapes_disagreeing_with_config_are_named(tiny_source, tmp_path):
    src = shutil.copytree(tiny_source("olmoe"), tmp_path / "src")
    config = config_of(src)
    config["vocab_size"] = 1000
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ConversionError,
        match=r"(lm_head|model\.embed_tokens)\.weight in model\.safetensors has shape \[512, 128\]; "
        r"config\.json .* implies \[1000, 128\]",
    ):
        convert(src, tmp_path / "out", SPEC, progress=False)
    config["vocab_size"], config["intermediate_size"] = 512, 256
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ConversionError,
        match=r"model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight in model\.safetensors",
    ):
        convert(src, tmp_path / "out", SPEC, progress=False)
    assert_nothing_written(tmp_path)


# --- resuming ------------------------------------------------------------------------


def expert_files(model_dir: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in (model_dir / EXPERTS_DIR).iterdir()}
    return files


QUANTIZE_EXPERT = convert_module._quantize_expert


class Interrupt:
    """Replaces _quantize_expert: raises KeyboardInterrupt (as Ctrl-C or SIGTERM would) on
    the call for ``(layer, expert)``, and records the layers it quantized."""

    def __init__(self, monkeypatch, at: tuple[int, int] | None):
        self.at = at
        self.layers: set[int] = set()
        monkeypatch.setattr(convert_module, "_quantize_expert", self)

    def __call__(self, source, expert, spec, layout, quantizer):
        ref = architecture("olmoe").classify(expert.down.tensor.name)
        self.layers.add(ref.layer)
        if (ref.layer, ref.expert) == self.at:
            raise KeyboardInterrupt("simulated kill")
        return QUANTIZE_EXPERT(source, expert, spec, layout, quantizer)


def test_interrupted_conversion_resumes_without_redoing_layers(
    tiny_source, tiny_converted, tmp_path, monkeypatch
):
    src = tiny_source("olmoe", num_hidden_layers=3)
    dst = tmp_path / "out"
    Interrupt(monkeypatch, at=(2, 5))  # in the middle of the last layer
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, SPEC, progress=False, workers=2)
    partial = partial_path(dst)
    assert not dst.exists() and [p.name for p in tmp_path.iterdir()] == [partial.name]
    recorded = json.loads((partial / "progress.json").read_text())["layers"]
    assert sorted(recorded) == ["0", "1"]
    finished = {
        n: (partial / EXPERTS_DIR / n).stat().st_mtime_ns
        for n in ("experts-layer-000.safetensors", "experts-layer-001.safetensors")
    }

    second = Interrupt(monkeypatch, at=None)
    counts = {}
    convert(src, dst, SPEC, progress=False, workers=2, counts=counts)
    assert second.layers == {2}
    assert counts["layers_done_before"] == 2 and counts["layers_converted"] == 1
    for name, mtime in finished.items():
        assert (dst / EXPERTS_DIR / name).stat().st_mtime_ns == mtime  # never rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not (dst / "progress.json").exists()

    fresh = convert(src, tmp_path / "fresh", SPEC, progress=False, workers=1)
    assert expert_files(dst) == expert_files(fresh)
    assert load_all_tensors(dst).keys() == load_all_tensors(fresh).keys()


def test_partial_state_is_trusted_only_when_complete_and_matching(
    tiny_source, tmp_path, monkeypatch, capsys
):
    src = tiny_source("olmoe", num_hidden_layers=3)
    dst = tmp_path / "out"
    Interrupt(monkeypatch, at=(2, 3))
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, SPEC, progress=False, workers=1)
    partial = partial_path(dst)
    # A layer file without its progress record (killed between rename and record) is redone,
    # and so is a recorded one that changed since.
    (partial / EXPERTS_DIR / "experts-layer-002.safetensors").write_bytes(b"not a finished layer")
    with open(partial / EXPERTS_DIR / "experts-layer-000.safetensors", "ab") as f:
        f.write(b"\0")
    second = Interrupt(monkeypatch, at=None)
    convert(src, dst, SPEC, progress=False, workers=1)
    assert second.layers == {0, 2}
    assert MWQCheckpoint(dst).verify() > 0

    # Other options: the partial state is discarded, with a message.
    shutil.rmtree(dst)
    Interrupt(monkeypatch, at=(1, 0))
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, SPEC, progress=False, workers=1)
    third = Interrupt(monkeypatch, at=None)
    convert(src, dst, MWQSpec(2, 4, 64), progress=False, workers=1)
    assert third.layers == {0, 1, 2}
    assert "another source or options; starting over" in capsys.readouterr().err
    assert MWQCheckpoint(dst).spec == MWQSpec(2, 4, 64)


# --- a medium model: SIGTERM and memory, in subprocesses ------------------------------

MEDIUM = dict(
    hidden_size=256,
    intermediate_size=512,
    num_experts=32,
    num_attention_heads=4,
    num_key_value_heads=4,
)
MEDIUM_LAYER_BYTES = 32 * 3 * 256 * 512 * 2  # bf16 experts of one layer: 25 MB


@pytest.fixture(scope="module")
def medium_source(tmp_path_factory):
    """``medium_source(layers)``: a random OLMoE-shaped model with 25 MB of experts per layer."""
    cache = {}

    def build(layers: int) -> Path:
        if layers not in cache:
            out = tmp_path_factory.mktemp(f"medium{layers}") / "hf"
            cache[layers] = write_random_model(
                "olmoe-1b-7b", out, layers=layers, progress=False, **MEDIUM
            )
        return cache[layers]

    return build


def convert_in_subprocess(src: Path, dst: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm_d2moe.cli",
            "convert",
            str(src),
            str(dst),
            "--group-size",
            "128",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigterm_keeps_finished_layers_and_no_temporary_folder(medium_source, tmp_path):
    src = medium_source(4)
    dst = tmp_path / "out"
    proc = convert_in_subprocess(src, dst, "--workers", "1")
    progress = partial_path(dst) / "progress.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(progress.read_text())["layers"]:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "run the same command again to continue" in err
    assert [p.name for p in tmp_path.iterdir()] == [partial_path(dst).name]  # no .out.tmp-*
    done = json.loads(progress.read_text())["layers"]
    assert 1 <= len(done) < 4

    counts = {}
    convert(src, dst, MWQSpec(2, 8, 128), progress=False, counts=counts)
    assert counts["layers_done_before"] == len(done) and counts["layers_converted"] == 4 - len(done)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    ckpt = MWQCheckpoint(dst)
    assert sorted(ckpt.layers) == list(range(4)) and ckpt.verify() > 0
    # The resumed layers equal the float64 reference quantization of the source.
    with safe_open(src / "model-00004-of-00004.safetensors", "pt") as f:
        down = f.get_tensor("model.layers.3.mlp.experts.31.down_proj.weight")
    stored = ckpt.read_expert(3, 31, 8)["down"]
    assert torch.equal(dequantize(stored), dequantize(quantize(down, MWQSpec(2, 8, 128))))


def peak_memory_of_conversion(src: Path, dst: Path) -> PeakMemory:
    proc = convert_in_subprocess(src, dst)
    with PeakMemory(proc.pid, interval=0.01) as peak:
        _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return peak


def test_memory_stays_flat_with_depth(medium_source, tmp_path):
    """Peak anonymous memory does not grow with the number of layers, and stays under one
    layer's source bytes + 1 GB; mapped source pages are dropped layer by layer."""
    shallow = peak_memory_of_conversion(medium_source(1), tmp_path / "one")
    deep = peak_memory_of_conversion(medium_source(4), tmp_path / "four")
    print(
        f"peak anonymous / file-backed RSS: 1 layer {shallow.anonymous >> 20} / "
        f"{shallow.file_backed >> 20} MiB, 4 layers {deep.anonymous >> 20} / "
        f"{deep.file_backed >> 20} MiB"
    )
    assert deep.anonymous < shallow.anonymous + 64 * 2**20, (shallow.anonymous, deep.anonymous)
    assert deep.anonymous < MEDIUM_LAYER_BYTES + 2**30
    assert deep.file_backed < shallow.file_backed + 2 * MEDIUM_LAYER_BYTES, (
        shallow.file_backed,
        deep.file_backed,
    )
