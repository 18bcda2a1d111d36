"""d2moe checkpoints served by vLLM (CPU) against the unquantized model, for every
supported architecture. Engines are shared through the ``engine_results`` fixture."""

import shutil

import pytest
import torch

from vllm_d2moe.testing.engine_runs import Run
from vllm_d2moe.testing.tiny_models import SUPPORTED_TINY_ARCHS

from conftest import PROMPTS, run_engines


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


def teacher_forced_agreement(quantized: list[dict], ref: list[dict]) -> float:
    """Share of the reference's greedy positions where the quantized model, given the
    same prefix, picks the same token."""
    hits = [
        int(max(scored, key=scored.get)) == token
        for q, r in zip(quantized, ref)
        for scored, token in zip(q["teacher_forced_logprobs"], r["token_ids"])
    ]
    return sum(hits) / len(hits)


def logprob_relative_error(quantized: list[dict], ref: list[dict]) -> float:
    """Mean relative L2 error of the full next-token log-prob vectors, same prefixes."""
    errors = [
        (torch.linalg.norm(_vectors(sq) - _vectors(sr)) / torch.linalg.norm(_vectors(sr))).item()
        for q, r in zip(quantized, ref)
        for sq, sr in zip(q["teacher_forced_logprobs"], r["logprobs"])
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


def test_detected_without_flag_under_torch_compile(engine_results):
    eager = outputs(engine_results, "mixtral/d2moe-8")
    compiled = outputs(engine_results, "mixtral/auto-compiled")
    assert token_match_rate(compiled, eager) >= 0.9


def test_width_outside_checkpoint_is_a_clear_error(engine_results):
    error = engine_results["mixtral/bits-out-of-range"].get("error", "")
    assert "d2moe option 'bits' 1 is outside this checkpoint's widths [2, 8]" in error


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
