"""d2moe checkpoints served by vLLM (CPU) against the unquantized model, for every
supported architecture. Engines are shared through the ``engine_results`` fixture."""

import shutil

import pytest
import torch

from vllm_d2moe.testing.engine_runs import Run
from vllm_d2moe.testing.tiny_models import SUPPORTED_TINY_ARCHS

from conftest import PROMPTS, run_engines, vocab_size


def outputs(results: dict, name: str) -> list[dict]:
    result = results[name]
    assert "error" not in result, f"{name} failed: {result['error']}"
    return result["outputs"]


def token_match_rate(a: list[dict], b: list[dict]) -> float:
    """Share of generated positions where two free-running greedy generations agree."""
    pairs = [(x, y) for oa, ob in zip(a, b) for x, y in zip(oa["token_ids"], ob["token_ids"])]
    return sum(x == y for x, y in pairs) / len(pairs)


def _vectors(position: dict[str, float]) -> torch.Tensor:
    return torch.tensor([position[t] for t in sorted(position, key=int)], dtype=torch.float64)


def _scored_positions(quantized: list[dict], ref: list[dict]):
    """Pairs of next-token log-prob vectors of both models at the reference's generated
    positions, both computed by the same (prefill) path from the same prefix."""
    for q, r in zip(quantized, ref):
        yield from zip(q["teacher_forced_logprobs"], r["teacher_forced_logprobs"])


def teacher_forced_agreement(quantized: list[dict], ref: list[dict]) -> float:
    """Share of positions where both models' greedy choice, given the same prefix, agree."""
    hits = [max(sq, key=sq.get) == max(sr, key=sr.get) for sq, sr in _scored_positions(quantized, ref)]
    return sum(hits) / len(hits)


def logprob_relative_error(quantized: list[dict], ref: list[dict]) -> float:
    """Mean relative L2 error of the full next-token log-prob vectors, same prefixes."""
    errors = [
        (torch.linalg.norm(_vectors(sq) - _vectors(sr)) / torch.linalg.norm(_vectors(sr))).item()
        for sq, sr in _scored_positions(quantized, ref)
    ]
    return sum(errors) / len(errors)


@pytest.mark.parametrize("arch", SUPPORTED_TINY_ARCHS)
def test_width_8_matches_unquantized(engine_results, report, arch):
    ref = outputs(engine_results, f"{arch}/unquantized")
    quantized = outputs(engine_results, f"{arch}/d2moe-8")
    agreement = teacher_forced_agreement(quantized, ref)
    free_running = token_match_rate(quantized, ref)
    error = logprob_relative_error(quantized, ref)
    report.add(
        f"{arch:12s} width 8 vs unquantized: greedy agreement {agreement:.1%} (same prefix), "
        f"{free_running:.1%} (free-running); final log-prob relative error {error:.2e}"
    )
    assert agreement >= 0.9
    assert all(o["text"] for o in quantized)


def test_lower_width_is_served(engine_results, report):
    ref = outputs(engine_results, "mixtral/unquantized")
    error_8 = logprob_relative_error(outputs(engine_results, "mixtral/d2moe-8"), ref)
    error_2 = logprob_relative_error(outputs(engine_results, "mixtral/d2moe-2"), ref)
    report.add(f"mixtral      width 2 vs unquantized: log-prob relative error {error_2:.2e}")
    # Fewer bits must show up as a larger deviation: the option reached the experts.
    assert error_2 > 3 * error_8


def test_dense_option_quantizes_the_other_layers_within_their_error(engine_results, report):
    ref = outputs(engine_results, "mixtral/unquantized")
    error_8 = logprob_relative_error(outputs(engine_results, "mixtral/d2moe-8"), ref)
    error_2 = logprob_relative_error(outputs(engine_results, "mixtral/d2moe-2"), ref)
    errors = {}
    for mode in ("int8", "int4", "w8a8"):
        dense = outputs(engine_results, f"mixtral/d2moe-8/dense-{mode}")
        errors[mode] = logprob_relative_error(dense, ref)
        report.add(f"mixtral      width 8, dense {mode} vs unquantized: log-prob relative error "
                   f"{errors[mode]:.2e} (experts alone {error_8:.2e}), greedy agreement "
                   f"{teacher_forced_agreement(dense, ref):.1%}")
    # The option reached the layers (more error than the experts' alone), int4 more than int8, and
    # none is far off: below what 2-bit experts cost. (The tiny random model's next tokens are
    # near-ties: int4 flips most greedy choices there, and 2-bit experts more; int8 keeps them.)
    assert error_8 < errors["int8"] < errors["int4"] < error_2
    assert error_8 < errors["w8a8"] < error_2
    for mode in ("int8", "w8a8"):  # 92.2 % and 89.1 % on Zen 4, torch 2.13
        assert teacher_forced_agreement(outputs(engine_results, f"mixtral/d2moe-8/dense-{mode}"), ref) >= 0.85


def test_detected_without_flag_under_torch_compile(engine_results):
    eager = outputs(engine_results, "mixtral/d2moe-8")
    compiled = outputs(engine_results, "mixtral/auto-compiled")
    assert token_match_rate(compiled, eager) >= 0.9


def test_width_outside_checkpoint_is_a_clear_error(engine_results):
    error = engine_results["mixtral/bits-out-of-range"].get("error", "")
    assert "d2moe option 'bits' 1 is outside this checkpoint's widths [2, 8]" in error


@pytest.mark.extended
def test_corrupt_expert_blob_fails_loading_with_its_name(model_zoo, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(model_zoo["mixtral"]["d2moe"], corrupt)
    blob_file = corrupt / "d2moe" / "experts-layer-001.safetensors"
    data = bytearray(blob_file.read_bytes())
    data[-100] ^= 0xFF  # inside the last expert's last residual plane
    blob_file.write_bytes(data)
    results, log = run_engines([Run("corrupt", str(corrupt), PROMPTS[:1], quantization="d2moe")], tmp_path)
    assert "error" in results["corrupt"]
    assert "experts-layer-001.safetensors: checksum mismatch in layer 1 expert 7" in log


@pytest.mark.parametrize(
    "expert_parallel, budget",
    [pytest.param(False, None, marks=pytest.mark.extended), pytest.param(True, None, marks=pytest.mark.extended),
     pytest.param(False, "100KiB", marks=pytest.mark.extended), (True, "300KiB")],
    ids=["tp2", "tp2-ep", "tp2-budget", "tp2-ep-budget"],
)
def test_two_ranks_match_single_process(model_zoo, engine_results, report, tmp_path, expert_parallel, budget):
    """TP=2 (vLLM's mp backend, one core per rank): each rank loads its slice of every
    plane and scale; with expert parallelism each rank instead holds half the experts.
    With a memory budget per rank the experts stream from disk: under TP one slice (less than a
    whole expert, 120 KiB at 8 bits here: accepted at start-up because a rank holds slices), under
    EP 2 whole experts of the 16. Either way the per-position distributions must equal
    the single-process run."""
    ref = outputs(engine_results, "mixtral/unquantized")
    single = outputs(engine_results, "mixtral/d2moe-8")
    model = str(model_zoo["mixtral"]["d2moe"])
    continuations = [{k: o[k] for k in ("prompt_token_ids", "token_ids")} for o in ref]
    overrides = {"quantization_config": {"quant_method": "d2moe", "memory_budget": budget}} if budget else {}
    run = Run("two-ranks", model, PROMPTS, quantization="d2moe", tensor_parallel_size=2,
              enable_expert_parallel=expert_parallel, logprobs=vocab_size(model),
              score_continuations=continuations, hf_overrides=overrides)
    results, _ = run_engines([run], tmp_path, extra_env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    two_ranks = outputs(results, "two-ranks")
    agreement = teacher_forced_agreement(two_ranks, single)
    error = logprob_relative_error(two_ranks, single)
    mode = ("TP=2+EP" if expert_parallel else "TP=2") + (f", budget {budget}/rank" if budget else "")
    report.add(f"mixtral      width 8, {mode} vs one process: greedy agreement {agreement:.1%}, "
               f"log-prob relative error {error:.2e}")
    assert agreement == 1.0
    assert error < 1e-4
