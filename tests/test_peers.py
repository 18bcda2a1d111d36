"""What benchmarks/peers.py reports rests on: a missing peer is skipped with a message, and
log-probs from another engine are scored against the reference exactly as vLLM's are."""

import importlib.util

import numpy as np

from vllm_d2moe.eval.peer_engines import llama_cpp_version
from vllm_d2moe.eval.scoring import compare_batches


def test_missing_llama_cpp_is_skipped_with_the_install_command(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a),
    )
    assert llama_cpp_version() is None
    message = capsys.readouterr().out
    assert "llama.cpp skipped" in message and ".[peers]" in message


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_external_log_probs_score_against_the_reference():
    rng = np.random.default_rng(0)
    count, window, vocab = 3, 5, 7
    reference = _log_softmax(rng.normal(size=(count, window, vocab))).astype(np.float32)
    model = _log_softmax(rng.normal(size=(count, window, vocab))).astype(np.float32)
    targets = rng.integers(vocab, size=(count, window))
    picked = np.take_along_axis(model, targets[..., None], -1)[..., 0]
    batches = [(model[i : i + 1], picked[i : i + 1]) for i in range(count)]  # one window per batch

    scores, kept = compare_batches(iter(batches), count, window, reference)

    assert kept is reference
    expected_kl = (np.exp(reference) * (reference - model)).sum(-1)
    np.testing.assert_allclose(scores.kl, expected_kl, rtol=1e-5)
    np.testing.assert_array_equal(scores.top1, reference.argmax(-1) == model.argmax(-1))
    np.testing.assert_allclose(scores.nll, -picked)
    same, _ = compare_batches(iter([(reference, reference[..., 0])]), count, window, reference)
    assert same.mean_kl == 0 and same.top1_agreement == 1
