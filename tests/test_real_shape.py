"""A real model's expert shape, served streamed: OLMoE-1B-7B's layers (hidden 2048, 64 experts of
intermediate 1024, top-8; random weights from ``d2moe random-model``) truncated to two, so that an
expert is megabytes, not kilobytes. Greedy tokens under every memory budget, down to one expert,
equal the all-resident tokens at the same width; a budget below one expert is refused with the
minimum.
"""

import shutil

import pytest

from vllm_d2moe.byte_sizes import format_bytes
from vllm_d2moe.converters.convert import convert
from vllm_d2moe.converters.random_model import write_random_model
from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
from vllm_d2moe.mwq.quantize import MWQSpec
from vllm_d2moe.offload.pool import expert_nbytes
from vllm_d2moe.testing.engine_runs import Run

from conftest import PROMPTS, check_streamed_run, run_engines

pytestmark = pytest.mark.slow

BITS = 4
LAYERS = 2


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    root = tmp_path_factory.mktemp("olmoe-2l")
    source = write_random_model("olmoe-1b-7b", root / "hf", layers=LAYERS, progress=False)
    model = convert(source, root / "d2moe", MWQSpec(2, BITS, 128), progress=False)
    shutil.rmtree(source)  # 1.6 GB of bf16 the conversion no longer needs
    return model


def _run(name: str, model, budget: int | None) -> Run:
    config = {"quant_method": "d2moe", "bits": BITS, **({"memory_budget": budget} if budget else {})}
    # In process: outputs do not depend on the process layout (test_process_layout.py), and the
    # sampler reads the pool from this process.
    return Run(name, str(model), PROMPTS, max_tokens=8, hf_overrides={"quantization_config": config},
               sample_offload=True)


@pytest.fixture(scope="module")
def expert_bytes(olmoe) -> int:
    return expert_nbytes(MWQCheckpoint(olmoe).layer(0).layout, BITS)


@pytest.fixture(scope="module")
def served(olmoe, expert_bytes, tmp_path_factory) -> dict:
    experts = LAYERS * 64
    slack = 1024  # the CPU kernel's layout adds read slack per tensor
    budgets = {
        "half": experts // 2 * expert_bytes + slack,
        # 16 experts: less than one layer's working set (4 prompts x top-8 at prefill)
        "eighth": experts // 8 * expert_bytes + slack,
        "one-expert": expert_bytes + slack,
        "below-one-expert": expert_bytes - 1,
    }
    runs = [_run("resident", olmoe, None), *(_run(name, olmoe, b) for name, b in budgets.items())]
    results, _ = run_engines(runs, tmp_path_factory.mktemp("olmoe-engines"))
    return results


@pytest.mark.parametrize("name", ["half", "eighth", "one-expert"])
def test_streamed_tokens_equal_all_resident_at_real_expert_size(served, report, name):
    assert "error" not in served["resident"], served["resident"]["error"]
    assert "error" not in served[name], served[name]["error"]
    report.add(f"OLMoE shape, 2 layers, {BITS} bits, budget {name:10s}: {check_streamed_run(served, name)}")


def test_budget_below_one_real_expert_is_refused_with_the_minimum(served, expert_bytes):
    error = served["below-one-expert"]["error"]
    assert f"needs at least {expert_bytes} bytes ({format_bytes(expert_bytes)})" in error
