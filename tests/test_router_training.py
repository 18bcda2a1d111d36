"""The router trainer's error objective: the allocation loss, the shifts it trains at, and the
measured pair costs against a float64 reference."""

import math

import pytest
import torch

from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
from vllm_d2moe.mwq.quantize import dequantize
from vllm_d2moe.router.loss import allocation_loss
from vllm_d2moe.router.model import WidthRouter
from vllm_d2moe.router.policy import ServingWidths
from vllm_d2moe.router.simulate import load_simulated_model, set_mode
from vllm_d2moe.router.train import PairCosts, shifts_at_breakpoints

WIDTHS = (2, 3, 4)


def test_allocation_loss_by_hand():
    costs = torch.tensor([[3.0, 1.0, 0.0], [0.5, 0.25, 0.0]])
    shifts = torch.tensor([1.0, 0.1])
    # logits equal to -costs: the router's shifted choice is the allocation's at every shift.
    assert float(allocation_loss(-costs, costs, WIDTHS, shifts)) == pytest.approx(0.0, abs=1e-7)
    logits = torch.zeros(2, 3)
    bits = torch.tensor(WIDTHS, dtype=torch.float64)
    expected = 0.0
    for c, s, z in zip(costs.double(), shifts.double(), logits.double()):
        p = torch.softmax(-c - s * bits, 0)
        q = torch.softmax(z - s * bits, 0)
        expected += float((p * (p / q).log()).sum())
    assert float(allocation_loss(logits, costs, WIDTHS, shifts)) == pytest.approx(expected / 2, rel=1e-5)


def test_shifts_are_drawn_from_the_pairs_breakpoints():
    costs = torch.tensor([[3.0, 1.0, 0.0], [0.5, 0.25, 0.0]])
    shifts = shifts_at_breakpoints(costs, WIDTHS, torch.Generator().manual_seed(0))
    assert shifts.shape == (2,)
    # pair 0 switches 2->3 bits at shift 2 and 3->4 at 1; pair 1 at 0.25 and 0.25
    assert set(shifts.tolist()) <= {2.0, 1.0, 0.25}
    spread = shifts_at_breakpoints(costs.repeat(500, 1), WIDTHS, torch.Generator().manual_seed(1))
    assert set(spread.tolist()) == {2.0, 1.0, 0.25}


def test_fitted_router_reproduces_the_error_aware_allocation():
    """Costs a per-expert router can represent exactly: after fitting at breakpoint shifts,
    its served choice is the allocation's at shifts across the whole range."""
    generator = torch.Generator().manual_seed(0)
    tokens, hidden, experts = 4096, 16, 4
    x = torch.randn(tokens, hidden, generator=generator)
    ids = torch.randint(experts, (tokens, 2), generator=generator)
    weights = torch.rand(tokens, 2, generator=generator)
    truth = WidthRouter(experts, hidden, len(WIDTHS)).requires_grad_(False)
    for p in truth.parameters():
        p.copy_(torch.randn(p.shape, generator=generator))
    costs = -truth(x, weights, ids).reshape(-1, 3)
    costs -= costs[:, -1:].clone()  # only differences between widths matter
    router = WidthRouter(experts, hidden, len(WIDTHS))
    optimizer = torch.optim.Adam(router.parameters(), lr=0.05)
    for step in range(300):
        shifts = shifts_at_breakpoints(costs, WIDTHS, torch.Generator().manual_seed(step))
        loss = allocation_loss(router(x, weights, ids).reshape(-1, 3), costs, WIDTHS, shifts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    bits = torch.tensor(WIDTHS, dtype=torch.float32)
    logits = router(x, weights, ids).reshape(-1, 3).detach()
    for shift in torch.quantile(shifts_at_breakpoints(costs, WIDTHS, generator), torch.tensor([0.1, 0.5, 0.9])):
        wanted = (costs + shift * bits).argmin(1)
        served = (logits.log_softmax(1) - shift * bits).argmax(1)
        assert (served == wanted).float().mean() > 0.95


def _expert_output(tensors, x: torch.Tensor, bits: int) -> torch.Tensor:
    """An MWQ expert's SwiGLU output at ``bits`` in float64."""
    gate, up = (dequantize(tensors["gate_up"].truncate(bits), torch.float64) @ x).chunk(2)
    return dequantize(tensors["down"].truncate(bits), torch.float64) @ (torch.nn.functional.silu(gate) * up)


def test_pair_costs_equal_a_float64_reference(model_zoo):
    ckpt = model_zoo["mixtral"]["d2moe"]
    checkpoint = MWQCheckpoint(ckpt)
    widest = checkpoint.spec.max_bits
    model = load_simulated_model(ckpt, ServingWidths("router", WIDTHS), {}, extra_widths=[widest])
    set_mode(model, f"fixed:{widest}")
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), PairCosts(model, WIDTHS) as recorder:
        model(input_ids=ids)
    assert sorted(recorder.records) == sorted(checkpoint.layers)
    for layer in recorder.records:
        hidden, weights, experts, costs = recorder.collected(layer)
        assert costs.shape == (*experts.shape, len(WIDTHS))
        for token, slot in [(0, 0), (7, 1), (hidden.shape[0] - 1, 0)]:
            expert = int(experts[token, slot])
            tensors = checkpoint.read_expert(layer, expert, widest)
            x = hidden[token].double()
            for k, bits in enumerate(WIDTHS):
                error = _expert_output(tensors, x, bits) - _expert_output(tensors, x, widest)
                expected = float(weights[token, slot].double() ** 2 * error.square().sum())
                assert math.isclose(float(costs[token, slot, k]), expected, rel_tol=2e-3, abs_tol=1e-9), (
                    layer, token, slot, bits)
