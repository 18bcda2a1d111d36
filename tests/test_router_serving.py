"""The bit-width router served by vLLM, against the transformers-side simulation of
the same width choices (``vllm_d2moe.router.simulate``), and per-request targets.

The router here is seeded random (large weights, so that choices are far from
ties and every width is used), not trained: these tests check that serving
applies a router exactly, not what it learned. ``d2moe train-router`` itself is
run on the same tiny model. Engines run float32 so that vLLM and transformers
see the same hidden states to ~1e-6.
"""

import math
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from vllm_d2moe.router.model import RouterSet
from vllm_d2moe.router.policy import ServingWidths
from vllm_d2moe.router.simulate import load_simulated_model, simulated_experts
from vllm_d2moe.testing.engine_runs import Run

from conftest import PROMPTS, run_engines
from conftest import ROUTER_CAPACITIES as CAPACITIES
from conftest import ROUTER_WIDTHS as WIDTHS

MAX_TOKENS = 12


def _override(**options) -> dict:
    return {"quantization_config": {"quant_method": "d2moe", **options}}


@pytest.fixture(scope="session")
def router_results(routed_mixtral, tmp_path_factory):
    model = str(routed_mixtral)
    low, high = 2.4, 3.6
    # Two runs in vLLM's default layout (per-request targets cross into the spawned engine core);
    # the rest in process, where engines start in a third of the time.
    runs = [
        Run("router-no-capacities", model, PROMPTS, max_tokens=MAX_TOKENS, in_process=True,
            hf_overrides=_override(capacities="off")),
        Run("router-default", model, PROMPTS, max_tokens=MAX_TOKENS),
        Run("shuffled", model, PROMPTS, max_tokens=MAX_TOKENS, in_process=True,
            hf_overrides=_override(width_policy="shuffled")),
        Run("target-low", model, PROMPTS, max_tokens=MAX_TOKENS, in_process=True,
            extra_args=[{"d2moe_target_bits": low}] * len(PROMPTS)),
        Run("target-high", model, PROMPTS, max_tokens=MAX_TOKENS, in_process=True,
            extra_args=[{"d2moe_target_bits": high}] * len(PROMPTS)),
        Run("targets-mixed", model, PROMPTS, max_tokens=MAX_TOKENS,
            extra_args=[{"d2moe_target_bits": t} for t in (low, high, low, high)]),
        Run("router-compiled", model, PROMPTS, max_tokens=MAX_TOKENS, enforce_eager=False, in_process=True,
            hf_overrides=_override(capacities="off")),
        Run("target-out-of-range", model, PROMPTS, in_process=True, hf_overrides=_override(target_bits=9.0)),
        Run("router-bfloat16", model, PROMPTS, max_tokens=MAX_TOKENS, dtype="bfloat16", in_process=True),
    ]
    results, _ = run_engines(runs, tmp_path_factory.mktemp("router-engines"))
    return results


def _ok(results, name):
    assert "error" not in results[name], f"{name}: {results[name].get('error')}"
    return results[name]


def test_served_router_equals_transformers_simulation(routed_mixtral, router_results, report):
    served = _ok(router_results, "router-no-capacities")
    policy = ServingWidths("router", WIDTHS, None)
    model = load_simulated_model(routed_mixtral, policy, RouterSet.load(routed_mixtral).routers)
    layers = simulated_experts(model)
    counts = {layer: torch.zeros(9, dtype=torch.long) for layer in layers}

    def count_choices(module, *_):
        counts[module.layer] += torch.bincount(torch.tensor(WIDTHS)[module.choice], minlength=9)

    for module in layers.values():
        module.register_forward_hook(count_choices)
    for out in served["outputs"]:
        prompt = torch.tensor([out["prompt_token_ids"]])
        with torch.no_grad():
            generated = model.generate(prompt, max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=0)
        expected = generated[0, prompt.shape[1]:].tolist()
        assert out["token_ids"] == expected[: len(out["token_ids"])], out["text"]
    simulated = {layer: {b: int(n) for b, n in enumerate(c.tolist()) if n} for layer, c in counts.items()}
    served_counts = {int(k): {int(b): n for b, n in v.items()} for k, v in served["widths"]["per_layer"].items()}
    assert served_counts == simulated
    assert all(len(hist) >= 2 for hist in simulated.values()), f"the router should mix widths: {simulated}"
    report.add(f"router served = transformers simulation: tokens equal, per-layer width counts {simulated}")


def test_compiled_router_serving_matches_eager(router_results):
    eager = _ok(router_results, "router-no-capacities")["outputs"]
    compiled = _ok(router_results, "router-compiled")["outputs"]
    assert [o["token_ids"] for o in compiled] == [o["token_ids"] for o in eager]


@pytest.mark.parametrize("name", ["router-default", "shuffled"])
def test_served_capacities_hold_in_every_batch(router_results, name):
    widths = _ok(router_results, name)["widths"]
    excess = widths["capacity_excess"]
    assert set(excess) == {"0", "1"}, "every layer call with capacities is checked"
    assert all(e < 1.0 for e in excess.values()), excess
    assert widths["average_bits"] == pytest.approx(3.0, abs=0.35)  # the 0.3/0.4/0.3 mix, per-batch rounding


def test_shuffled_deals_other_widths_than_the_router(router_results):
    # Same model and mix rule; which pair gets which width is what differs (seeded, so reproducible).
    shuffled = _ok(router_results, "shuffled")["outputs"]
    default = _ok(router_results, "router-default")["outputs"]
    assert [o["token_ids"] for o in shuffled] != [o["token_ids"] for o in default]


def test_per_request_target_changes_the_average_width(router_results, report):
    low = _ok(router_results, "target-low")["widths"]["average_bits"]
    high = _ok(router_results, "target-high")["widths"]["average_bits"]
    assert low < high - 0.5
    assert abs(low - 2.4) < 0.4 and abs(high - 3.6) < 0.4
    # Side by side in one batch: every request gets what it would get alone.
    mixed = _ok(router_results, "targets-mixed")["outputs"]
    alone_low = _ok(router_results, "target-low")["outputs"]
    alone_high = _ok(router_results, "target-high")["outputs"]
    for i, out in enumerate(mixed):
        alone = (alone_low if i % 2 == 0 else alone_high)[i]
        assert out["token_ids"] == alone["token_ids"]
    report.add(f"per-request target bits 2.4 / 3.6: measured average width {low:.2f} / {high:.2f}")


def test_router_serves_bfloat16_models(router_results):
    # vLLM builds the model under the serving dtype; the router keeps float32 scores.
    widths = _ok(router_results, "router-bfloat16")["widths"]
    assert all(len(hist) >= 2 for hist in widths["per_layer"].values()), widths


def test_target_out_of_range_is_refused_at_start(router_results):
    error = router_results["target-out-of-range"].get("error", "")
    assert "target_bits 9.0 is outside the router's calibrated range" in error


def test_router_requested_without_router_is_a_clear_error(model_zoo, tmp_path):
    from vllm_d2moe.vllm_glue.quant_config import D2MoEConfig

    config = D2MoEConfig.from_config({"quant_method": "d2moe", "width_policy": "router"})
    with pytest.raises(RuntimeError, match="has no bit-width router.*d2moe train-router"):
        config.maybe_update_config(str(model_zoo["mixtral"]["d2moe"]))


def test_train_router_command_writes_and_resumes(model_zoo, tmp_path):
    ckpt = tmp_path / "mixtral"
    shutil.copytree(model_zoo["mixtral"]["d2moe"], ckpt)
    calib = tmp_path / "calib.txt"
    calib.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(400)))
    command = [sys.executable, "-m", "vllm_d2moe.cli", "train-router", str(ckpt), "--calib", str(calib),
               "--batch-size", "2", "--seq-len", "32", "--save-every", "1", "--no-progress"]
    # Interrupted (Ctrl-C) after its first saved step, a run keeps its state...
    proc = subprocess.Popen(command + ["--steps", "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = ckpt / "d2moe" / "router-training.pt"
    deadline = time.monotonic() + 300
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "run the same command to resume" in err, err
    stopped = int(err.split("stopped at step ")[1].split(";")[0])
    assert not (ckpt / "d2moe" / "router.safetensors").exists()
    # ... and the same command resumes from it.
    target = stopped + 2
    resumed = subprocess.run(command + ["--steps", str(target)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {stopped}" in resumed.stdout
    assert not state.exists()
    routers = RouterSet.load(ckpt)
    assert routers.training["steps"] == target and routers.capacities == CAPACITIES
    averages = [a for _, a in routers.calibration]
    assert averages == sorted(averages, reverse=True) and math.isclose(max(averages), 4.0)
