"""Expert predictors (vllm_d2moe.prefetch) on tiny transformers models of every supported
architecture: the ``gate`` predictor fed a layer's true post-attention residual routes exactly as
the model does (scoring, renormalisation, DeepSeek grouping and correction bias), its widths are
serving's, recall is counted right on hand-made sets, and bad checkpoints are clear errors."""

import json
import math
from unittest import mock

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vllm_d2moe import width_selection
from vllm_d2moe.mwq.checkpoint import CheckpointError
from vllm_d2moe.mwq.quantize import MWQSpec
from vllm_d2moe.prefetch.gates import CheckpointGates, GateError
from vllm_d2moe.prefetch.learned import LearnedPredictor, predictor_path
from vllm_d2moe.prefetch.predictors import GatePredictor, build_predictor
from vllm_d2moe.prefetch.recall import SetCounts, set_counts
from vllm_d2moe.prefetch.routing import RoutingRule
from vllm_d2moe.prefetch.train import train_predictor
from vllm_d2moe.router.model import RouterSet, WidthRouter
from vllm_d2moe.router.policy import ServingWidths
from vllm_d2moe.testing.tiny_models import SUPPORTED_TINY_ARCHS, tiny_config
from vllm_d2moe.width_selection import WidthSelector

_DEEPSEEK_ATTENTION = dict(q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
                           v_head_dim=32, num_key_value_heads=4)

# name -> (tiny_models arch or None, config overrides). Three or four layers so that depth 2 exists.
CASES = {
    **{arch: (arch, {"num_hidden_layers": 3}) for arch in SUPPORTED_TINY_ARCHS if arch != "deepseek_v2"},
    "qwen3_moe-unnormalised": ("qwen3_moe", {"num_hidden_layers": 3, "norm_topk_prob": False}),
    # One dense layer, then MoE layers; vLLM's grouped top-k with one group.
    "deepseek_v2": ("deepseek_v2", {"num_hidden_layers": 4}),
    # Four groups of two experts, the best two groups compete (vLLM groups every DeepSeek model;
    # transformers does when topk_method says so, so both agree here).
    "deepseek_v2-grouped": ("deepseek_v2", {"num_hidden_layers": 4, "topk_method": "group_limited_greedy",
                                            "n_group": 4, "topk_group": 2}),
    # Sigmoid scores, correction bias in the choice, groups scored by their best two, renormalised,
    # scaled on the output (not in the weights the expert method sees).
    "deepseek_v3": (None, dict(
        num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, moe_intermediate_size=64, n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc", **_DEEPSEEK_ATTENTION)),
}


def _config(name: str) -> transformers.PretrainedConfig:
    arch, overrides = CASES[name]
    if arch is not None:
        return tiny_config(arch, dtype="float32", **overrides)
    return transformers.DeepseekV3Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4,
        max_position_embeddings=256, initializer_range=0.1, dtype="float32", tie_word_embeddings=False,
        **overrides,
    )


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict[str, "object"]:
    """``{case: (model_dir, model)}``: each case saved (the predictor reads the files) and kept loaded."""
    built = {}
    for name in CASES:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config(name), dtype=torch.float32).eval()
        if name == "deepseek_v3":  # a bias large enough to change choices (checked in the test)
            for layer in model.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.2)
        model_dir = tmp_path_factory.mktemp(name)
        model.save_pretrained(model_dir)
        built[name] = (model_dir, model)
    return built


def _capture(model, ids: torch.Tensor) -> dict[int, tuple]:
    """Per MoE layer: (post-attention residual, router input, transformers' weights, transformers' ids)."""
    captured, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None:
            continue
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, args, i=i: captured.__setitem__(i, [args[0].reshape(-1, args[0].shape[-1])])))
        hooks.append(gate.register_forward_hook(
            lambda m, args, out, i=i: captured[i].extend([args[0].reshape(-1, args[0].shape[-1]), out[1], out[2]])))
    try:
        with torch.no_grad():
            model.model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


@pytest.mark.parametrize("name", list(CASES))
def test_gate_predictor_from_the_true_input_reproduces_routing(tiny_checkpoints, name):
    model_dir, model = tiny_checkpoints[name]
    ids = torch.randint(2, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    captured = _capture(model, ids)
    gates = CheckpointGates(model_dir)
    assert gates.moe_layers == sorted(captured)
    predictor = GatePredictor(gates, depth=1)
    scale = getattr(model.config, "routed_scaling_factor", 1.0) if name.startswith("deepseek") else 1.0
    for layer, (residual, router_input, weights, routed) in captured.items():
        # The state that enters layer `layer`'s MoE block, handed over one layer early (depth 1).
        [forecast] = predictor.predict(layer - 1, residual)
        assert forecast.layer == layer and forecast.depth == 1
        assert torch.equal(gates.moe_input(layer, residual), router_input), "the norm, bit for bit"
        assert torch.equal(forecast.expert_ids.sort(1).values, routed.long().sort(1).values), f"layer {layer}"
        # Weights as vLLM hands them to the expert method: transformers' without the output scale.
        expected = weights.gather(1, routed.argsort(1)).double() / scale
        got = gates.route(layer, router_input)[0].gather(1, forecast.expert_ids.argsort(1)).double()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_the_correction_bias_and_the_groups_decide(tiny_checkpoints):
    """The DeepSeek-V3 case only passes above if bias and grouping are applied: without them the
    routing differs (so that test can fail)."""
    model_dir, model = tiny_checkpoints["deepseek_v3"]
    captured = _capture(model, torch.randint(2, 512, (2, 40), generator=torch.Generator().manual_seed(1)))
    gates = CheckpointGates(model_dir)
    assert gates.rule.corrected and gates.rule.num_groups == 4 and gates.rule.scoring == "sigmoid"
    layer = gates.moe_layers[0]
    _, router_input, _, routed = captured[layer]
    logits = gates.logits(layer, router_input)
    for rule in (RoutingRule(8, 2, "sigmoid", True, True, 1, 1, True),  # no groups
                 RoutingRule(8, 2, "sigmoid", True, True, 4, 2, False)):  # no bias
        _, ids = rule.rank(logits, gates.gates[layer].correction_bias)
        assert not torch.equal(ids.sort(1).values, routed.long().sort(1).values)


def test_depth_and_spares(tiny_checkpoints):
    model_dir, model = tiny_checkpoints["deepseek_v2"]
    gates = CheckpointGates(model_dir)
    assert gates.moe_layers == [1, 2, 3]  # layer 0 is dense: not predicted, not counted
    hidden = torch.randn(5, 128, generator=torch.Generator().manual_seed(2))
    plain = GatePredictor(gates, depth=3).predict(0, hidden)
    assert [(f.layer, f.depth) for f in plain] == [(1, 1), (2, 2), (3, 3)]
    assert [f.layer for f in GatePredictor(gates, depth=3).predict(2, hidden)] == [3]
    widened = GatePredictor(gates, depth=3, extra=3).predict(0, hidden)
    for p, w in zip(plain, widened):
        assert w.expert_ids.shape == (5, 5)
        assert torch.equal(w.expert_ids[:, :2], p.expert_ids), "the routed guess comes first, unchanged"
        assert all(len(set(row)) == 5 for row in w.expert_ids.tolist()), "spares are other experts"
        assert w.widths is None


def _write_routers(model_dir, layers, experts=8, hidden=128, widths=(2, 3, 4)) -> RouterSet:
    generator = torch.Generator().manual_seed(3)
    routers = {}
    for layer in layers:
        router = WidthRouter(experts, hidden, len(widths))
        with torch.no_grad():
            for p in router.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
        routers[layer] = router.requires_grad_(False)
    (model_dir / "d2moe").mkdir(exist_ok=True)
    routers = RouterSet(widths=widths, kind="expert", routers=routers, capacities=(0.3, 0.4, 0.3),
                        calibration=((-4.0, 4.0), (0.0, 3.0), (4.0, 2.0)))
    routers.save(model_dir)
    return routers


def test_predicted_widths_are_servings_choice(tiny_checkpoints):
    model_dir, model = tiny_checkpoints["mixtral"]
    gates = CheckpointGates(model_dir)
    calibration = _write_routers(model_dir, gates.moe_layers).calibration
    captured = _capture(model, torch.randint(2, 512, (2, 40), generator=torch.Generator().manual_seed(1)))
    for policy in (ServingWidths("router", (2, 3, 4), capacities=(0.3, 0.4, 0.3), calibration=calibration),
                   ServingWidths("router", (2, 3, 4), shift=0.5, calibration=calibration)):
        predictor = GatePredictor.from_checkpoint(model_dir, depth=1, extra=2, policy=policy)
        routers = RouterSet.load(model_dir)
        for layer, (residual, router_input, weights, routed) in captured.items():
            [forecast] = predictor.predict(layer - 1, residual)
            # Serving's width decision (the torch ops: the C++ one is tested against them in test_router.py).
            with mock.patch.object(width_selection, "_fused_kernel", lambda: None):
                served = WidthSelector(layer, policy, routers.routers[layer])(router_input, weights, routed)
            assert torch.equal(forecast.expert_ids[:, :2], routed.long())
            assert torch.equal(forecast.widths[:, :2], served)
            assert bool((forecast.widths[:, 2:] == 2).all()), "spares at the narrowest width"
            # Per-request targets: half the tokens ask for 2.5 bits.
            targets = torch.full((router_input.shape[0],), float("nan"))
            targets[::2] = 2.5
            [forecast] = predictor.predict(layer - 1, residual, targets)
            with mock.patch.object(width_selection, "_fused_kernel", lambda: None):
                served = WidthSelector(layer, policy, routers.routers[layer])(router_input, weights, routed, targets)
            assert torch.equal(forecast.widths[:, :2], served)
    fixed = GatePredictor.from_checkpoint(model_dir, depth=2, policy=ServingWidths("fixed", (3,)))
    assert all(bool((f.widths == 3).all()) for f in fixed.predict(0, captured[1][0]))


def test_recall_counts_by_hand():
    # Two tokens, 4 experts, top-2 routed; predicted 3 per token.
    routed = torch.tensor([[0, 1], [2, 3]])
    predicted = torch.tensor([[1, 0, 2], [2, 0, 1]])
    per_token = set_counts(predicted, routed, 4)
    assert (per_token.routed, per_token.predicted, per_token.covered, per_token.groups) == (4, 6, 3, 2)
    assert per_token.recall == 0.75 and per_token.precision == 0.5 and per_token.extra_per_group == 1.0
    # One batch of both tokens: routed {0,1,2,3}, predicted {0,1,2}.
    batch = set_counts(predicted, routed, 4, batch=2)
    assert (batch.routed, batch.predicted, batch.covered, batch.groups) == (4, 3, 3, 1)
    # Widths: a predicted width below the widest routed need does not cover it.
    routed_w = torch.tensor([[4, 2], [3, 3]], dtype=torch.int8)
    predicted_w = torch.tensor([[2, 4, 2], [3, 2, 2]], dtype=torch.int8)
    widths = set_counts(predicted, routed, 4, predicted_widths=predicted_w, routed_widths=routed_w)
    # token 0: expert 0 needs 4, predicted 4 (covered); expert 1 needs 2, predicted 2 (covered);
    # token 1: expert 2 needs 3, predicted 3 (covered); expert 3 not predicted.
    assert widths.covered == 3
    batch_w = set_counts(predicted, routed, 4, batch=2, predicted_widths=predicted_w, routed_widths=routed_w)
    # batch: expert 0 needs 4 (pred 4), 1 needs 2 (pred 2), 2 needs 3 (pred max(2, 3) = 3), 3 missed.
    assert batch_w.covered == 3
    total = SetCounts()
    total += per_token
    total += batch
    assert (total.routed, total.covered, total.groups) == (8, 6, 3)
    assert math.isnan(SetCounts().recall)
    with pytest.raises(ValueError, match="3 rows do not split into groups of 2"):
        set_counts(predicted[:1].repeat(3, 1), routed[:1].repeat(3, 1), 4, batch=2)


def test_bad_checkpoints_are_clear_errors(tiny_checkpoints, tmp_path):
    model_dir, _ = tiny_checkpoints["olmoe"]
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    tensors = load_file(model_dir / "model.safetensors")
    # No router for layer 1.
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.gate.weight"},
              tmp_path / "model.safetensors")
    with pytest.raises(GateError, match=r"tensor model\.layers\.1\.mlp\.gate\.weight \(layer 1's router\) "
                                        r"is missing"):
        CheckpointGates(tmp_path)
    # A config that disagrees with the tensors.
    save_file(tensors, tmp_path / "model.safetensors")
    config = json.loads((model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_experts": 16}))
    with pytest.raises(GateError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.gate\.weight "
                                        r"\(layer 0's router\) has shape \[8, 128\], config.json implies \[16, 128\]"):
        CheckpointGates(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        CheckpointGates(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GateError, match="model.safetensors"):
        CheckpointGates(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(GateError, match="has no config.json"):
        CheckpointGates(tmp_path)


def test_bad_options_are_clear_errors(tiny_checkpoints):
    model_dir, _ = tiny_checkpoints["mixtral"]
    with pytest.raises(ValueError, match=r"'predictor' must be one of \['gate', 'learned'\], got 'shadow'"):
        build_predictor(model_dir, "shadow", depth=1)
    gates = CheckpointGates(model_dir)
    with pytest.raises(ValueError, match="depth must be at least 1"):
        GatePredictor(gates, depth=0)
    with pytest.raises(ValueError, match=r"extra experts must be in \[0, 6\]"):
        GatePredictor(gates, depth=1, extra=7)
    with pytest.raises(ValueError, match="width policy 'router' needs the checkpoint's bit-width routers"):
        GatePredictor(gates, depth=1, policy=ServingWidths("router", (2, 3)))


# The learned predictor: trained on a tiny MWQ conversion, from its gate predictor up.


@pytest.fixture(scope="module")
def converted_pair(tiny_checkpoints, tmp_path_factory):
    """Conversions of a tiny Mixtral, of another with different weights, and of the first at other widths."""
    from vllm_d2moe.converters.convert import convert

    root = tmp_path_factory.mktemp("converted")
    other_dir = root / "other-hf"
    torch.manual_seed(5)
    transformers.AutoModelForCausalLM.from_config(_config("mixtral"), dtype=torch.float32).save_pretrained(other_dir)
    mixtral = tiny_checkpoints["mixtral"][0]
    return [convert(src, root / name, spec, progress=False, workers=1)
            for name, src, spec in (("mixtral", mixtral, MWQSpec(2, 4, 64)), ("other", other_dir, MWQSpec(2, 4, 64)),
                                    ("mixtral-2-8", mixtral, MWQSpec(2, 8, 64)))]


def test_learned_predictor_trains_saves_and_loads(converted_pair):
    checkpoint, other, reconverted = converted_pair
    windows = torch.randint(2, 512, (8, 32), generator=torch.Generator().manual_seed(4))
    gates = CheckpointGates(checkpoint)
    hidden = torch.randn(6, 128, generator=torch.Generator().manual_seed(6))
    untrained = LearnedPredictor.untrained(gates, depth=2, width=16)
    for a, b in zip(untrained.predict(0, hidden), GatePredictor(gates, depth=2).predict(0, hidden)):
        assert torch.equal(a.expert_ids, b.expert_ids), "zero corrections: the gate predictor"
    path = train_predictor(checkpoint, windows, depth=2, width=16, steps=40, batch_size=64, lr=1e-2, seed=0)
    assert path == predictor_path(checkpoint)
    with safe_open(path, "pt") as f:
        training = json.loads(f.metadata()["training"])
    assert set(training["history"]) == {"0->1", "0->2", "1->2"}
    for losses in training["history"].values():
        assert losses["last_loss"] < losses["first_loss"], losses
    learned = build_predictor(checkpoint, "learned", depth=1, extra=1)
    [forecast] = learned.predict(0, hidden)
    assert forecast.layer == 1 and forecast.expert_ids.shape == (6, 3)
    trained_logits = learned.logits(0, 1, gates.moe_input(1, hidden))
    assert not torch.equal(trained_logits, gates.logits(1, gates.moe_input(1, hidden))), "the correction is loaded"
    with pytest.raises(CheckpointError, match="predicts 2 layers ahead; prefetch depth 3 asks for more"):
        LearnedPredictor.load(checkpoint, depth=3)
    # A predictor trained for another model, a corrupt file, no file: each named.
    predictor_path(other).write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match=r"predictor\.safetensors was trained for another model"):
        LearnedPredictor.load(other, depth=1)
    predictor_path(reconverted).write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match=r"predictor\.safetensors was trained for another conversion"):
        LearnedPredictor.load(reconverted, depth=1)
    predictor_path(other).write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"predictor\.safetensors: unreadable expert predictor file"):
        LearnedPredictor.load(other, depth=1)
    predictor_path(other).unlink()
    with pytest.raises(CheckpointError, match=r"has no learned expert predictor .*d2moe train-predictor"):
        build_predictor(other, "learned", depth=1)
