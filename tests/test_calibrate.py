"""Calibrated MWQ (vllm_d2moe.mwq.calibrate, d2moe convert --calibrate).

The objective is checked against a float64 reference (``output_error`` recomputed here
as ``||X (W - Q)^T||^2`` from the inputs themselves), on random data with a known
Hessian: correlated inputs of unequal scales, as activations are.
"""

import json
import textwrap
from pathlib import Path

import pytest
import torch

from vllm_d2moe.converters.architectures import ConversionError
from vllm_d2moe.converters.calibration import SEGMENT_TOKENS
from vllm_d2moe.converters.convert import convert
from vllm_d2moe.mwq.calibrate import calibrated_quantize, output_error
from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
from vllm_d2moe.mwq.layout import ExpertLayout
from vllm_d2moe.mwq.quantize import MWQError, MWQSpec, dequantize, nearest_plane, quantize
from vllm_d2moe.testing.compare import diverge_only_at_near_ties
from vllm_d2moe.testing.engine_runs import Run
from vllm_d2moe.testing.tiny_models import make_tiny_model

from conftest import PROMPTS, run_engines

REFERENCE = Path(__file__).resolve().parents[1] / "vllm_d2moe" / "assets" / "reference-small"
SPEC = MWQSpec(2, 8, 64)


def _inputs(cols: int, tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=generator) / cols**0.5 + torch.eye(cols)
    scales = torch.linspace(0.2, 3.0, cols)
    return (torch.randn(tokens, cols, generator=generator) @ mix * scales).double()


@pytest.fixture(scope="module")
def problem():
    x = _inputs(256, 2048, seed=0)
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    return weight, x, x.T @ x


def _error(weight: torch.Tensor, approximation: torch.Tensor, x: torch.Tensor) -> float:
    """The float64 reference: squared output error on the inputs themselves."""
    return float(((x @ (weight.double() - approximation.double()).T) ** 2).sum())


def test_objective_is_the_output_error(problem):
    weight, x, hessian = problem
    approximation = dequantize(quantize(weight, SPEC).truncate(3))
    assert output_error(weight, approximation, hessian) == pytest.approx(_error(weight, approximation, x), rel=1e-9)


def _row_errors(weight: torch.Tensor, approximation: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return ((x @ (weight.double() - approximation.double()).T) ** 2).sum(0)


def _weights(kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 256, generator=generator)
    if kind == "heavy-tailed":  # outliers, as trained weights have: wide groups, coarse base grids
        weight = weight * torch.exp(torch.randn(48, 256, generator=generator))
    return weight


@pytest.mark.parametrize("kind", ["normal", "heavy-tailed"])
@pytest.mark.parametrize("guarded_up_to", [None, 4])
def test_every_width_of_every_row_is_no_worse_than_round_to_nearest(problem, kind, guarded_up_to):
    """Float64 output errors, per row, from the inputs themselves. Up to ``guarded_up_to``
    (default: every width) each width's is at most round-to-nearest MWQ's; at every width
    at most that of the round-to-nearest plane fitted to what the calibrated widths below
    leave. Unguarded (GPTQ's base and planes at every width) the widths above 4 lost
    against round-to-nearest MWQ here: the compensated base leaves weights beyond the
    reach of the planes above it (9x its error at width 8)."""
    _, x, hessian = problem
    weight = _weights(kind)
    (calibrated,) = calibrated_quantize(weight, hessian, SPEC, guarded_up_to=guarded_up_to)
    rtn = quantize(weight, SPEC)
    ratios, worse, worse_given_below = {}, {}, {}
    for b in SPEC.widths:
        ours = _row_errors(weight, dequantize(calibrated.truncate(b)), x)
        theirs = _row_errors(weight, dequantize(rtn.truncate(b)), x)
        ratios[b] = round(float(ours.sum() / theirs.sum()), 4)
        if b <= (guarded_up_to or SPEC.max_bits):
            worse[b] = (ours > theirs).sum().item()
        if b > SPEC.min_bits:
            below = weight.double() - dequantize(calibrated.truncate(b - 1)).double()
            groups = below.view(weight.shape[0], -1, SPEC.group_size)
            added = nearest_plane(groups, calibrated.base_scale, b - 1 - SPEC.min_bits)[2]
            given_below = _row_errors(weight, weight.double() - (below - added.view(weight.shape)), x)
            # (1e-6: the float32 reconstruction against this float64 one)
            worse_given_below[b] = (ours > given_below * (1 + 1e-6)).sum().item()
    assert not any(worse.values()), f"rows worse than round-to-nearest MWQ by width: {worse}; ratios {ratios}"
    assert not any(worse_given_below.values()), f"rows worse than a round-to-nearest plane: {worse_given_below}"
    if guarded_up_to is None:
        assert ratios[SPEC.max_bits] < 0.95, ratios
    else:  # the unguarded low widths gain more
        assert all(ratios[b] < 0.95 for b in range(3, guarded_up_to + 1)), ratios


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_non_nested_calibrated_beats_round_to_nearest_at_each_width(problem, bits):
    weight, x, hessian = problem
    spec = MWQSpec(bits, bits, 64)
    (calibrated,) = calibrated_quantize(weight, hessian, spec)
    assert _error(weight, dequantize(calibrated), x) < _error(weight, dequantize(quantize(weight, spec)), x)


def test_plane_scales_solve_the_least_squares_problem(problem):
    """The fitted scales of given signs equal a float64 least-squares solve of
    ``min_a ||X (r - M a)^T||`` per row (``M``: the signs spread over the groups)."""
    from vllm_d2moe.mwq.calibrate import _least_squares_scales

    weight, x, hessian = problem
    residual = weight - dequantize(quantize(weight, MWQSpec(2, 2, 64)))
    signs = torch.where(torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)) > 0, 1.0, -1.0)
    fitted = _least_squares_scales(residual[None], signs[None], hessian.float()[None], 64)[0]
    for row in range(0, weight.shape[0], 7):
        spread = torch.zeros(256, 4, dtype=torch.float64)
        for g in range(4):
            spread[g * 64 : (g + 1) * 64, g] = signs[row, g * 64 : (g + 1) * 64].double()
        expected = torch.linalg.lstsq(x @ spread, x @ residual[row].double()).solution
        assert torch.allclose(fitted[row], expected, rtol=1e-3, atol=1e-6 * expected.abs().max())


def test_nesting_is_exact_every_width_decodes_from_its_prefix():
    hidden, intermediate = 128, 64
    x_in, x_mid = _inputs(hidden, 512, seed=2), _inputs(intermediate, 512, seed=3)
    generator = torch.Generator().manual_seed(4)
    gate_up = torch.randn(3, 2 * intermediate, hidden, generator=generator)
    down = torch.randn(3, hidden, intermediate, generator=generator)
    inputs = torch.stack([x_in, 2 * x_in, x_in.flip(1)])
    hessians_in = inputs.transpose(1, 2) @ inputs
    hessians_mid = torch.stack([x_mid.T @ x_mid] * 3)
    layout = ExpertLayout(SPEC, hidden, intermediate)
    batched_up = calibrated_quantize(gate_up, hessians_in, SPEC)
    batched_down = calibrated_quantize(down, hessians_mid, SPEC)
    for e in range(3):
        (alone,) = calibrated_quantize(gate_up[e], hessians_in[e], SPEC)  # a batch = one at a time
        assert torch.equal(dequantize(alone), dequantize(batched_up[e]))
        blob = layout.encode({"gate_up": batched_up[e], "down": batched_down[e]})
        for bits in SPEC.widths:
            prefix = blob[: layout.nbytes(bits)].clone()  # nothing past the prefix
            decoded = layout.decode(prefix, bits)
            assert torch.equal(dequantize(decoded["gate_up"]), dequantize(batched_up[e].truncate(bits)))
            assert torch.equal(dequantize(decoded["down"]), dequantize(batched_down[e].truncate(bits)))
            assert torch.equal(blob[: layout.nbytes(bits)], prefix)


def test_bad_hessians_are_named():
    weight = torch.randn(8, 64)
    with pytest.raises(MWQError, match="expert 3.*Hessian has shape"):
        calibrated_quantize(weight, torch.eye(32), MWQSpec(2, 4, 64), name="expert 3")
    with pytest.raises(MWQError, match="expert 3.*Hessian is zero"):
        calibrated_quantize(weight, torch.zeros(64, 64), MWQSpec(2, 4, 64), name="expert 3")
    with pytest.raises(MWQError, match="NaN"):
        calibrated_quantize(weight, torch.full((64, 64), float("nan")), MWQSpec(2, 4, 64))


# --- d2moe convert --calibrate --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model("mixtral", tmp_path_factory.mktemp("tiny") / "mixtral")


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    import argparse
    import inspect

    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(inspect.getsource(argparse) + inspect.getsource(json.decoder))
    return path


@pytest.mark.parametrize(
    "content, tokens, message",
    [
        ("   \n", 512, "calibration text is empty"),
        ("def f():\n    return 1\n", 4096, "has .* tokens; --calibration-tokens asks for 4096"),
        ('{"input_ids": [5, 6, 100000]}\n', 256, "token id 100000 is outside the model's vocabulary"),
        ('{"input": "x"}\n', 256, "expected an object with 'text' or 'input_ids'"),
    ],
)
def test_unusable_calibration_text_is_refused_before_any_work(tiny, tmp_path, content, tokens, message):
    text = tmp_path / ("text.jsonl" if content.startswith("{") else "text.txt")
    text.write_text(content)
    dst = tmp_path / "out"
    with pytest.raises(ConversionError, match=message):
        convert(tiny, dst, SPEC, progress=False, calibration_tokens_requested=tokens, calibration_text=[text])
    assert not dst.exists() and not any(tmp_path.glob(".out*"))


def test_fewer_tokens_than_a_segment_is_refused(tiny, tmp_path, calibration_file):
    with pytest.raises(ConversionError, match=f"one segment of {SEGMENT_TOKENS}"):
        convert(tiny, tmp_path / "out", SPEC, progress=False, calibration_tokens_requested=10,
                calibration_text=[calibration_file])


def test_an_expert_no_token_reaches_keeps_the_uncalibrated_fit(tmp_path):
    """The reference model's expert 6 of layer 1 receives no token of its training text's
    first 1024 calibration tokens (nor of 8192): it falls back, and the index says so."""
    dst = tmp_path / "ref-cal"
    counts = {}
    convert(REFERENCE, dst, MWQSpec(2, 4, 128), progress=False, counts=counts, calibration_tokens_requested=1024)
    uncalibrated = counts["uncalibrated_experts"]
    assert 6 in uncalibrated[1], uncalibrated
    checkpoint = MWQCheckpoint(dst)
    assert checkpoint.source["calibration"]["uncalibrated_experts"] == {str(k): v for k, v in uncalibrated.items()}
    plain = convert(REFERENCE, tmp_path / "ref", MWQSpec(2, 4, 128), progress=False)
    stored, rtn = checkpoint.read_expert(1, 6, 4), MWQCheckpoint(plain).read_expert(1, 6, 4)
    calibrated_expert, rtn_other = checkpoint.read_expert(1, 0, 4), MWQCheckpoint(plain).read_expert(1, 0, 4)
    for proj in ("gate_up", "down"):
        assert torch.equal(dequantize(stored[proj]), dequantize(rtn[proj]))
        assert not torch.equal(dequantize(calibrated_expert[proj]), dequantize(rtn_other[proj]))


# Widths 7-8 serve one-token steps from bfloat16 lookup tables on planes past the second
# (kernels/cpu_bitplanes.cpp, kTwoPartLeadingPlanes), rounding each of those planes' partial
# sums to 2^-9 relative, so greedy choices may differ from the float32 simulation at near-ties
# (one seen 0.001 nats apart); a wrong computation lands far from the top.
LOOKUP_NEAR_TIE_NATS = 0.01


def _simulated_run(model, served: dict) -> dict:
    """``model``'s greedy continuation of each of ``served``'s prompts, cut to the served length, as an engine
    run with the log-probabilities of its 20 most likely tokens at each position (the reference of
    :func:`~vllm_d2moe.testing.compare.diverge_only_at_near_ties`)."""
    outputs = []
    for out in served["outputs"]:
        prompt = len(out["prompt_token_ids"])
        with torch.no_grad():
            ids = model.generate(torch.tensor([out["prompt_token_ids"]]), max_new_tokens=16, do_sample=False,
                                 min_new_tokens=0)
            top = torch.log_softmax(model(ids).logits[0, prompt - 1 : -1].double(), -1).topk(20)
        outputs.append({
            "token_ids": ids[0, prompt:].tolist()[: len(out["token_ids"])],
            "logprobs": [dict(zip(map(str, i.tolist()), v.tolist(), strict=True)) for v, i in zip(*top, strict=True)],
        })
    return {"outputs": outputs}


def test_served_calibrated_checkpoint_equals_the_transformers_simulation(tiny, tmp_path, calibration_file, report):
    from vllm_d2moe.router.policy import ServingWidths
    from vllm_d2moe.router.simulate import load_simulated_model, set_mode

    dst = convert(tiny, tmp_path / "mixtral-cal", SPEC, progress=False, calibration_tokens_requested=1024,
                  calibration_text=[calibration_file])
    widths = (2, 8)
    runs = [
        Run(f"cal-{b}", str(dst), PROMPTS, quantization="d2moe", in_process=True,
            hf_overrides={"quantization_config": {"quant_method": "d2moe", "bits": b}})
        for b in widths
    ]
    results, _ = run_engines(runs, tmp_path / "engines")
    for b in widths:
        served = results[f"cal-{b}"]
        assert "error" not in served, served.get("error")
        model = load_simulated_model(dst, ServingWidths("fixed", (b,)))
        set_mode(model, f"fixed:{b}")
        problems = diverge_only_at_near_ties(_simulated_run(model, served), served, LOOKUP_NEAR_TIE_NATS)
        assert problems == [], (b, problems)
    report.add(textwrap.shorten(f"calibrated tiny Mixtral served at widths {widths} = transformers simulation", 200))
