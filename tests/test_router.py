"""The bit-width router: assignment rules, loss, file format and options on toy inputs
with hand-computed expectations (no vLLM engine here; see test_router_serving.py)."""

import logging
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_d2moe import width_selection
from vllm_d2moe.kernels import cpu_width_select
from vllm_d2moe.mwq.checkpoint import CheckpointError
from vllm_d2moe.mwq.quantize import MWQSpec
from vllm_d2moe.router import assign
from vllm_d2moe.router.loss import expected_bits, router_loss, task_kl
from vllm_d2moe.router.model import ROUTER_FILE, RouterSet, WidthRouter
from vllm_d2moe.router.policy import ServingWidths, choose_pair_widths, resolve_policy
from vllm_d2moe.width_selection import WIDTH_STATS, WidthSelector


def test_capacity_assignment_by_hand():
    # Five pairs, widths (2, 3, 4), capacities 0.2/0.4/0.4 -> at most 1/2/2 pairs.
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # wants 2 most strongly: gets 2
            [0.8, 0.0, 0.1],  # wants 2, which is full: second choice 4
            [0.0, 0.7, 0.2],  # 3
            [0.1, 0.6, 0.5],  # 3 (second-highest bidder for 3)
            [0.2, 0.5, 0.4],  # wants 3, full: 4 (its 2 comes after 4)
        ]
    )
    assert assign.capacity_limits([0.2, 0.4, 0.4], 5) == [1, 2, 2]
    assert assign.assign_with_capacities(scores, [0.2, 0.4, 0.4]).tolist() == [0, 2, 1, 1, 2]
    # Without capacities every pair takes its favourite.
    assert assign.choose_widths(scores, None).tolist() == [0, 0, 1, 1, 1]


@settings(max_examples=60, deadline=None)
@given(
    pairs=st.integers(1, 300),
    raw=st.lists(st.floats(0.05, 1.0), min_size=3, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_capacities_hold_within_one_pair(pairs, raw, seed):
    capacities = [r / sum(raw) for r in raw]  # sums to 1: the tightest case
    scores = torch.randn(pairs, 3, generator=torch.Generator().manual_seed(seed))
    choice = assign.assign_with_capacities(scores, capacities)
    assert bool((choice >= 0).all()), "every pair gets a width"
    counts = torch.bincount(choice, minlength=3).tolist()
    for count, c in zip(counts, capacities):
        assert count < c * pairs + 1


def test_capacities_are_validated():
    with pytest.raises(ValueError, match="sum to 0.900 < 1"):
        assign.check_capacities([0.3, 0.3, 0.3], 3)
    with pytest.raises(ValueError, match="2 values for 3 widths"):
        assign.check_capacities([0.5, 0.5], 3)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        assign.check_capacities([1.5, 0.0, 0.0], 3)


def test_shift_lowers_widths_and_target_interpolates():
    scores = torch.tensor([[0.0, 0.1, 0.3]])  # favourite: width 4
    widths = (2, 3, 4)
    assert assign.shift_scores(scores, widths, 0.0).argmax(1).item() == 2
    # Shift 0.2 per bit: 0 - 0.4, 0.1 - 0.6, 0.3 - 0.8 -> width 2 wins.
    assert assign.shift_scores(scores, widths, 0.2).argmax(1).item() == 0
    table = [(-1.0, 4.0), (0.0, 3.5), (1.0, 2.5), (2.0, 2.0)]
    assert assign.shift_for_target(table, 3.0) == pytest.approx(0.5)
    assert assign.shift_for_target(table, 4.0) == pytest.approx(-1.0)
    assert assign.shift_for_target(table, 2.25) == pytest.approx(1.5)
    with pytest.raises(ValueError, match=r"outside the router's calibrated range \[2.000, 4.000\]"):
        assign.shift_for_target(table, 4.5)


def test_loss_by_hand():
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))
    student = torch.log(torch.tensor([[0.25, 0.75]]))
    # KL(t || s) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)
    expected_kl = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert task_kl(student, teacher).item() == pytest.approx(expected_kl, rel=1e-6)
    # Two layers: expected widths 0.5*2+0.5*4 = 3 and 4 -> mean 3.5.
    probs = [torch.tensor([[0.5, 0.0, 0.5]]), torch.tensor([[0.0, 0.0, 1.0]])]
    assert expected_bits(probs, (2, 3, 4)).item() == pytest.approx(3.5)
    parts = router_loss(student, teacher, probs, (2, 3, 4), alpha=0.1)
    assert parts.total.item() == pytest.approx(expected_kl + 0.35, rel=1e-6)


@pytest.mark.parametrize("kind", ["expert", "layer"])
def test_router_logits_match_the_formula(kind):
    torch.manual_seed(0)
    router = WidthRouter(num_experts=4, hidden=8, num_widths=3, kind=kind)
    for p in router.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(5, 8)
    ids = torch.randint(0, 4, (5, 2))
    weights = torch.rand(5, 2)
    got = router(x, weights, ids)
    for t in range(5):
        for j in range(2):
            row = ids[t, j].item() if kind == "expert" else 0
            want = router.weight[row] @ x[t] + router.bias[row] + router.gain[row] * weights[t, j]
            torch.testing.assert_close(got[t, j], want, rtol=1e-5, atol=1e-5)


def _write_router(model_dir, num_layers=2, experts=4, hidden=8, capacities=(0.3, 0.4, 0.3)):
    (model_dir / "d2moe").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    routers = {layer: WidthRouter(experts, hidden, 3) for layer in range(num_layers)}
    for r in routers.values():
        for p in r.parameters():
            torch.nn.init.normal_(p)
    RouterSet((2, 3, 4), "expert", routers, capacities, ((-1.0, 4.0), (1.0, 2.0)), {"steps": 1}).save(model_dir)
    return routers


def test_router_file_round_trip_and_errors(tmp_path):
    routers = _write_router(tmp_path)
    loaded = RouterSet.load(tmp_path)
    assert loaded.widths == (2, 3, 4) and loaded.capacities == (0.3, 0.4, 0.3)
    assert loaded.calibration == ((-1.0, 4.0), (1.0, 2.0)) and loaded.training == {"steps": 1}
    for layer, router in routers.items():
        torch.testing.assert_close(loaded.routers[layer].weight, router.weight.detach(), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="tensor layers.7.weight is missing"):
        RouterSet.load(tmp_path, layers=[7])
    path = tmp_path / "d2moe" / ROUTER_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable bit-width router file"):
        RouterSet.load(tmp_path)
    path.unlink()
    with pytest.raises(CheckpointError, match="has no bit-width router.*d2moe train-router"):
        RouterSet.load(tmp_path)


def test_width_options_resolve(tmp_path):
    spec = MWQSpec(2, 8, 64)
    # No router: the widest stored width by default; asking for the router is a clear error.
    assert resolve_policy(str(tmp_path), spec, None, None, None, None) == ServingWidths("fixed", (8,))
    assert resolve_policy(str(tmp_path), spec, None, 3, None, None) == ServingWidths("fixed", (3,))
    with pytest.raises(CheckpointError, match="has no bit-width router"):
        resolve_policy(str(tmp_path), spec, "router", None, None, None)
    with pytest.raises(ValueError, match="'bits' \\(3\\) and 'width_policy' \\('fixed:4'\\) disagree"):
        resolve_policy(str(tmp_path), spec, "fixed:4", 3, None, None)
    with pytest.raises(ValueError, match="must be 'router', 'shuffled' or 'fixed:B'"):
        resolve_policy(str(tmp_path), spec, "smart", None, None, None)
    _write_router(tmp_path)
    # Batch-independent by default: no per-call capacities, the calibrated shift of the trained mix
    # (0.3/0.4/0.3 of 2/3/4 bits: 3.0, shift 0 on this calibration); capacities only when asked for.
    routed = resolve_policy(str(tmp_path), spec, None, None, None, None)
    assert (routed.mode, routed.widths, routed.capacities, routed.resident_bits) == ("router", (2, 3, 4), None, 4)
    assert routed.shift == pytest.approx(0.0) and not routed.adaptive
    capped = resolve_policy(str(tmp_path), spec, None, None, None, [0.2, 0.3, 0.5])
    assert capped.capacities == (0.2, 0.3, 0.5) and capped.shift == pytest.approx(0.0)
    targeted = resolve_policy(str(tmp_path), spec, "router", None, 2.5, None)
    assert targeted.capacities is None and targeted.shift == pytest.approx(0.5)
    assert targeted.adaptive and targeted.target_bits == 2.5
    assert resolve_policy(str(tmp_path), spec, "router", None, None, "off").capacities is None
    with pytest.raises(ValueError, match="outside the router's calibrated range"):
        resolve_policy(str(tmp_path), spec, "router", None, 1.5, None)


def test_selector_counts_and_per_request_targets():
    torch.manual_seed(2)
    router = WidthRouter(4, 8, 3)
    for p in router.parameters():
        torch.nn.init.normal_(p)
    calibration = tuple((s, 3.0 - s) for s in (-1.0, 0.0, 1.0))  # toy: target 2 <-> shift 1
    policy = ServingWidths("router", (2, 3, 4), (0.3, 0.4, 0.3), calibration=calibration)
    selector = WidthSelector(layer=5, policy=policy, router=router)
    x, ids, weights = torch.randn(40, 8), torch.randint(0, 4, (40, 2)), torch.rand(40, 2)
    WIDTH_STATS.reset()
    widths = selector(x, weights, ids)
    counts = WIDTH_STATS.snapshot()[5]
    assert sum(counts.values()) == 80 and counts == {b: int((widths == b).sum()) for b in counts}
    for b, c in zip((2, 3, 4), policy.capacities):
        assert counts.get(b, 0) < c * 80 + 1
    # Tokens of a request with its own target use its shift and no capacities.
    targets = torch.full((40,), math.nan)
    targets[:20] = 2.0
    mixed = selector(x, weights, ids, targets)
    scores = selector.scores(x, weights, ids)
    own = assign.shift_scores(scores[:40], policy.widths, 1.0).argmax(1)
    assert mixed[:20].reshape(-1).tolist() == [policy.widths[i] for i in own.tolist()]
    rest = choose_pair_widths(scores[40:], policy)
    assert mixed[20:].reshape(-1).tolist() == [policy.widths[i] for i in rest.tolist()]


def test_pareto_rows_by_hand():
    from vllm_d2moe.eval.report import router_pareto

    rows = [
        {"name": "mwq-2", "method": "mwq", "bits_per_weight": 2.0, "perplexity": 10.0, "kl": 0.4},
        {"name": "mwq-3", "method": "mwq", "bits_per_weight": 3.0, "perplexity": 8.0, "kl": 0.2},
        {"name": "router", "method": "router", "bits_per_weight": 2.5, "perplexity": 8.5, "kl": 0.25},
        {"name": "shuffled", "method": "shuffled", "bits_per_weight": 2.5, "perplexity": 9.5, "kl": 0.35},
        {"name": "router-2.2", "method": "router", "bits_per_weight": 2.2, "perplexity": 9.8, "kl": 0.3},
        {"name": "shuffled-2.2", "method": "shuffled", "bits_per_weight": 2.2, "error": "failed"},
    ]
    first, second = router_pareto(rows)
    # Fixed at 2.5 bits: halfway between 10 and 8 -> 9 (KL 0.3).
    assert first["fixed_perplexity"] == pytest.approx(9.0) and first["fixed_kl"] == pytest.approx(0.3)
    assert first["beats_fixed"] and first["beats_shuffled"]
    # At 2.2 bits fixed is 9.6 < 9.8; the shuffled run failed, so nothing to beat.
    assert second["fixed_perplexity"] == pytest.approx(9.6)
    assert not second["beats_fixed"] and not second["beats_shuffled"]
    assert second["shuffled_perplexity"] is None


# The C++ width decision (kernels/cpu_width_select), taken by WidthSelector on CPU,
# against the torch ops it replaces (forced by making the kernel unavailable).

needs_avx2 = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="the C++ width decision needs AVX2"
)


def _selector_both_ways(policy, router, x, weights, ids, layer=3):
    """(widths, stats) from the C++ path and from the torch path, each from a fresh selector of ``layer``."""
    assert width_selection._fused_kernel() is not None, "the C++ width decision must build here"
    results = []
    for fused in (True, False):
        WIDTH_STATS.reset()
        if fused:
            widths = WidthSelector(layer, policy, router)(x, weights, ids)
        else:
            with mock.patch.object(width_selection, "_fused_kernel", lambda: None):
                widths = WidthSelector(layer, policy, router)(x, weights, ids)
        results.append((widths, WIDTH_STATS.snapshot(), WIDTH_STATS.capacity_excess()))
    WIDTH_STATS.reset()
    return results


def _dyadic(shape, scale, generator):
    """Small multiples of ``scale``: every product and sum of the router is exact in float32, in any order."""
    return torch.randint(-15, 16, shape, generator=generator) * scale


@needs_avx2
@settings(max_examples=80, deadline=None)
@given(
    tokens=st.sampled_from([1, 2, 5, 64, 300]),
    top_k=st.sampled_from([1, 2, 8]),
    num_widths=st.sampled_from([1, 3, 7]),
    hidden=st.sampled_from([1, 7, 40, 256]),
    kind=st.sampled_from(["expert", "layer"]),
    mode=st.sampled_from(["router", "shuffled"]),
    with_capacities=st.booleans(),
    shift=st.sampled_from([0.0, 0.25, -0.5]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpp_width_decision_equals_the_torch_ops(
    tokens, top_k, num_widths, hidden, kind, mode, with_capacities, shift, dtype, ties, seed
):
    g = torch.Generator().manual_seed(seed)
    experts = 10
    router = WidthRouter(experts, hidden, num_widths, kind).requires_grad_(False)
    router.weight.copy_(_dyadic(router.weight.shape, 1 / 16, g))
    router.bias.copy_(_dyadic(router.bias.shape, 1 / 4, g))
    router.gain.copy_(_dyadic(router.gain.shape, 1 / 4, g))
    x = _dyadic((tokens, hidden), 1 / 8, g)
    weights = torch.randint(0, 9, (tokens, top_k), generator=g) / 8
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]).int()
    if ties:  # the last width scores as the first; odd tokens repeat even ones (pairs tie across tokens)
        for p in (router.weight, router.bias, router.gain):
            p[:, -1] = p[:, 0]
        for t in (x, weights, ids):
            t[1::2] = t[0::2][: t[1::2].shape[0]]
    widths = tuple(range(2, 2 + num_widths))
    capacities = None
    if with_capacities:
        raw = torch.rand(num_widths, generator=g) + 0.05
        capacities = assign.check_capacities((raw / raw.sum() + 1e-6).clamp(max=1.0).tolist(), num_widths)
    policy = ServingWidths(mode, widths, capacities, shift)
    (fused, fused_counts, fused_excess), (reference, counts, excess) = _selector_both_ways(
        policy, router, x.to(dtype), weights, ids
    )
    assert fused.dtype == torch.int8 and fused.shape == ids.shape
    assert torch.equal(fused, reference)
    assert fused_counts == counts and fused_excess == excess


@needs_avx2
@pytest.mark.parametrize("kind", ["expert", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_width_decision_on_gaussian_inputs(kind, dtype):
    # Float sums in another order than torch's GEMM: equal widths unless scores tie to a few ulp,
    # which these seeded draws (7200 pairs) never do.
    g = torch.Generator().manual_seed(7)
    router = WidthRouter(64, 2048, 3, kind).requires_grad_(False)
    for p in router.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    x = torch.randn(300, 2048, generator=g).to(dtype)
    weights, ids = torch.randn(300, 64, generator=g).softmax(-1).topk(8, dim=-1)
    for capacities in ((0.3, 0.4, 0.3), None):
        (fused, *_), (reference, *_) = _selector_both_ways(
            ServingWidths("router", (2, 3, 4), capacities), router, x, weights, ids
        )
        assert torch.equal(fused, reference)
        assert len(reference.unique()) == 3, "every width is used"


def test_width_decision_falls_back_to_torch_ops_with_the_reason(caplog, monkeypatch):
    def broken_load():
        raise RuntimeError("g++ not found")

    monkeypatch.setattr(cpu_width_select, "load", broken_load)
    with caplog.at_level(logging.WARNING, logger="vllm_d2moe.width_selection"):
        assert width_selection._fused_kernel.__wrapped__() is None
    assert "g++ not found" in caplog.text
