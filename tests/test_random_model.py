"""`d2moe random-model`: presets keep their real config; written checkpoints load and convert.

Full-size layers are 0.8-2.8 GB, so the written models here shrink the widths
(``write_random_model``'s config overrides, listed in the config's note); the
full-size shape plans are checked against transformers' own modules on the meta
device, which allocates nothing.
"""

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from vllm_d2moe import cli
from vllm_d2moe.converters.architectures import architecture
from vllm_d2moe.converters.convert import convert
from vllm_d2moe.converters.random_model import (
    PRESETS,
    TOKENIZER_FIELDS,
    RandomModelError,
    model_config,
    shard_plans,
    write_random_model,
)
from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
from vllm_d2moe.mwq.quantize import MWQSpec

# Widths small enough to write, load and convert in a second; structure (layer kinds,
# attention type, shared experts, dense first layer) unchanged.
SHRINK = {
    "olmoe-1b-7b": dict(
        hidden_size=128,
        intermediate_size=128,
        num_experts=8,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    "qwen3-30b-a3b": dict(
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_experts=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    ),
    "mixtral-8x7b": dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2
    ),
    "deepseek-v2-lite": dict(
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        n_routed_experts=8,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
}
# Facts from each model's hub card / config.json that the issue names.
EXPECTED = {
    "olmoe-1b-7b": dict(
        model_type="olmoe",
        num_hidden_layers=16,
        hidden_size=2048,
        num_attention_heads=16,
        num_experts=64,
        num_experts_per_tok=8,
        intermediate_size=1024,
    ),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe",
        num_hidden_layers=48,
        hidden_size=2048,
        num_attention_heads=32,
        num_key_value_heads=4,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
    ),
    "mixtral-8x7b": dict(
        model_type="mixtral",
        num_hidden_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=14336,
    ),
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2",
        num_hidden_layers=27,
        hidden_size=2048,
        num_attention_heads=16,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        moe_intermediate_size=1408,
        first_k_dense_replace=1,
        kv_lora_rank=512,
        q_lora_rank=None,
    ),
}
# The smallest depth with a MoE layer (DeepSeek-V2's first layer is dense).
SMALL_DEPTH = {"olmoe-1b-7b": 1, "qwen3-30b-a3b": 1, "mixtral-8x7b": 1, "deepseek-v2-lite": 2}


@pytest.fixture(scope="module", params=sorted(PRESETS))
def preset(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def written(preset, tmp_path_factory):
    out = tmp_path_factory.mktemp(preset) / "hf"
    return write_random_model(
        preset, out, layers=SMALL_DEPTH[preset] + 1, seed=3, progress=False, **SHRINK[preset]
    )


def test_every_issue_preset_exists():
    assert set(EXPECTED) <= set(PRESETS)


def test_config_is_the_presets_but_the_tokenizer_fields(preset):
    config = model_config(preset)
    hub = PRESETS[preset].config
    for key, value in EXPECTED[preset].items():
        assert config[key] == value, key
    for key, value in hub.items():
        if key not in TOKENIZER_FIELDS:
            assert config[key] == value, key
    assert config["vocab_size"] == 8192 and config["architectures"] == hub["architectures"]
    note = config["d2moe_random_model"]
    assert note["original"]["vocab_size"] == hub["vocab_size"]
    assert "vocabulary shrank" in note["note"]


def test_full_size_shapes_match_transformers(preset):
    """Per-tensor shapes of a 2-layer full-width plan against transformers' module on the meta
    device (transformers 5 fuses experts in memory: compare those by element count)."""
    config = model_config(preset, layers=SMALL_DEPTH[preset] + 1)
    planned = {t.name: t.shape for shard in shard_plans(config) for t in shard}
    hf_config = transformers.AutoConfig.for_model(
        config["model_type"], **{k: v for k, v in config.items() if k != "model_type"}
    )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    actual = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    arch = architecture(config["model_type"])
    experts_planned = sum(torch.Size(s).numel() for n, s in planned.items() if arch.classify(n))
    experts_actual = sum(torch.Size(s).numel() for n, s in actual.items() if ".experts." in n)
    assert experts_planned == experts_actual > 0
    # transformers 5 renames Mixtral's block_sparse_moe to mlp in memory.
    dense_planned = {
        n.replace(".block_sparse_moe.", ".mlp."): s
        for n, s in planned.items()
        if not arch.classify(n)
    }
    dense_actual = {n: s for n, s in actual.items() if ".experts." not in n}
    assert dense_planned == dense_actual


def test_written_model_loads_in_transformers_and_runs(preset, written):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        written, output_loading_info=True
    )
    assert not any(info.values()), info
    config = json.loads((written / "config.json").read_text())
    assert config["architectures"] == PRESETS[preset].config["architectures"]
    assert config["num_hidden_layers"] == SMALL_DEPTH[preset] + 1
    for key in SHRINK[preset]:
        assert config["d2moe_random_model"]["original"][key] == PRESETS[preset].config[key]
    tokenizer = transformers.AutoTokenizer.from_pretrained(written)
    ids = tokenizer("def main():\n    return 0", return_tensors="pt").input_ids
    assert int(ids.max()) < config["vocab_size"]
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits.std() > 0
    std = model.get_input_embeddings().weight.float().std().item()
    assert abs(std - 0.02) < 0.002  # initializer_range


def test_written_model_is_sharded_by_layer_and_converts(preset, written, tmp_path):
    index = json.loads((written / "model.safetensors.index.json").read_text())
    layers = SMALL_DEPTH[preset] + 1
    assert len(set(index["weight_map"].values())) == layers
    for name, file in index["weight_map"].items():
        if name.startswith("model.layers."):
            assert file == f"model-{int(name.split('.')[2]) + 1:05d}-of-{layers:05d}.safetensors", (
                name
            )
    dst = convert(written, tmp_path / "d2moe", MWQSpec(2, 4, 64), progress=False)
    config = json.loads((written / "config.json").read_text())
    moe_layers = architecture(config["model_type"]).moe_layers(config)
    assert sorted(MWQCheckpoint(dst).layers) == moe_layers
    assert MWQCheckpoint(dst).verify() > 0


def test_fewer_layers_write_a_prefix_of_the_same_weights(tmp_path):
    small = write_random_model(
        "olmoe-1b-7b", tmp_path / "a", layers=1, seed=5, progress=False, **SHRINK["olmoe-1b-7b"]
    )
    large = write_random_model(
        "olmoe-1b-7b", tmp_path / "b", layers=2, seed=5, progress=False, **SHRINK["olmoe-1b-7b"]
    )
    other = write_random_model(
        "olmoe-1b-7b", tmp_path / "c", layers=2, seed=6, progress=False, **SHRINK["olmoe-1b-7b"]
    )
    name = "model.layers.0.mlp.experts.3.up_proj.weight"
    with (
        safe_open(small / "model-00001-of-00001.safetensors", "pt") as a,
        safe_open(large / "model-00001-of-00002.safetensors", "pt") as b,
        safe_open(other / "model-00001-of-00002.safetensors", "pt") as c,
    ):
        assert torch.equal(a.get_tensor(name), b.get_tensor(name))
        assert not torch.equal(b.get_tensor(name), c.get_tensor(name))


def test_bad_options_are_refused(tmp_path, capsys):
    with pytest.raises(RandomModelError, match="unknown preset 'olmoe'.*olmoe-1b-7b"):
        model_config("olmoe")
    with pytest.raises(RandomModelError, match=r"--layers must be in \[1, 16\]"):
        model_config("olmoe-1b-7b", layers=17)
    with pytest.raises(RandomModelError, match="1 layer.*no MoE layer.*first MoE layer is 1"):
        model_config("deepseek-v2-lite", layers=1)
    out = tmp_path / "taken"
    out.mkdir()
    assert cli.main(["random-model", "mixtral-8x7b", str(out), "--layers", "1"]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert cli.main(["random-model", "mixtral-8x7b", str(tmp_path / "x"), "--layers", "0"]) == 1
    assert "--layers must be in [1, 32]" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
