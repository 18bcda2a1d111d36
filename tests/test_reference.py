"""Tests for the reference-model corpus, tokenizer and trainer (about a minute on CPU)."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vllm_d2moe import token_windows
from vllm_d2moe.reference import corpus, train
from vllm_d2moe.reference.corpus import Document
from vllm_d2moe.reference.tokenizer import (
    BOS_ID,
    EOS_ID,
    encode_documents,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # Multi-threaded kernels crawl when the cores are shared with other jobs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- corpus -----------------------------------------------------------------


def _read_ids(corpus_dir: Path, split: str) -> list[str]:
    return [doc.id for doc in corpus.load_documents(split, corpus_dir)]


def test_split_is_deterministic_disjoint_and_about_90_5_5(tmp_path):
    docs = [Document(id=f"synthetic/doc-{i}.rst", text=f"document {i}") for i in range(4000)]
    corpus.write_corpus(docs, tmp_path / "a", packages={})
    corpus.write_corpus(list(reversed(docs)), tmp_path / "b", packages={})
    splits = {name: _read_ids(tmp_path / "a", name) for name in corpus.SPLITS}
    for name in corpus.SPLITS:
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    all_ids = [doc_id for ids in splits.values() for doc_id in ids]
    assert sorted(all_ids) == sorted(doc.id for doc in docs)  # disjoint and complete
    assert 150 <= len(splits["valid"]) <= 250
    assert 150 <= len(splits["test"]) <= 250
    manifest = corpus.read_manifest(tmp_path / "a")
    assert manifest["splits"]["valid"]["documents"] == len(splits["valid"])


def test_split_assignment_is_pinned():
    # Changing the hash would move documents between train and test and
    # silently invalidate held-out numbers of existing checkpoints.
    assert corpus.split_of("linux/RCU/NMI-RCU.rst") == "test"
    assert corpus.split_of("linux/admin-guide/binderfs.rst") == "valid"
    assert corpus.split_of("python/library/os.rst") == "train"


def test_clean_text_normalises_whitespace_and_drops_licence_tags():
    raw = ".. SPDX-License-Identifier: GPL-2.0\r\n\r\nTitle  \r\n=====\n\n\n\n\nBody\ttext \n"
    assert corpus.clean_text(raw) == "Title\n=====\n\nBody\ttext"


def test_missing_apt_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus.shutil, "which", lambda tool: None)
    with pytest.raises(RuntimeError, match="apt-get"):
        corpus.ensure_corpus(tmp_path / "corpus")


def test_write_corpus_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        corpus.write_corpus([Document("x", "y")], tmp_path, packages={})
    assert (tmp_path / "precious.txt").exists()


@pytest.mark.skipif(corpus.read_manifest() is None, reason="run `python -m vllm_d2moe.reference.corpus` first")
def test_real_corpus_is_split_by_id_hash_and_sliceable():
    manifest = corpus.read_manifest()
    seen = set()
    for name in corpus.SPLITS:
        ids = _read_ids(None, name)
        assert len(ids) == manifest["splits"][name]["documents"]
        assert all(corpus.split_of(doc_id) == name for doc_id in ids)
        assert seen.isdisjoint(ids)
        seen.update(ids)
    assert manifest["splits"]["train"]["megabytes"] > 20
    valid_slice = corpus.load_slice("valid", 20_000)
    assert sum(map(len, valid_slice)) == 20_000
    assert valid_slice[0] == corpus.load_split("valid")[0][: len(valid_slice[0])]


# --- tokenizer --------------------------------------------------------------


def _stdlib_docstring_documents() -> list[Document]:
    """Real English prose that is always available offline."""
    docs = []
    for module_name in ("argparse", "collections", "email.message", "inspect", "json", "logging",
                        "os", "pathlib", "re", "subprocess", "threading", "typing", "unittest"):
        module = importlib.import_module(module_name)
        for name, member in inspect.getmembers(module):
            doc = inspect.getdoc(member)
            if not name.startswith("_") and doc and len(doc) >= corpus.MIN_DOCUMENT_CHARS:
                docs.append(Document(id=f"stdlib/{module_name}/{name}", text=doc))
    return docs


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """A small corpus: real documents when the corpus is cached, else stdlib docstrings."""
    if corpus.read_manifest() is not None:
        docs = corpus.load_documents("train")[:80] + corpus.load_documents("valid")[:10]
    else:
        docs = _stdlib_docstring_documents()
    path = tmp_path_factory.mktemp("small") / "corpus"
    corpus.write_corpus(docs, path, packages={})
    return path


def test_tokenizer_round_trips_and_marks_documents(small_corpus, tmp_path):
    tokenizer = train_tokenizer(corpus.load_slice("train", 100_000, small_corpus), 512, 256)
    save_tokenizer(tokenizer, tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = load_tokenizer(tmp_path)
    text = "Hello  world!\n\tdef f(x):\r\n    return x ** 2  # ünïcödé 🙂\n\n"
    ids = loaded(text).input_ids
    assert ids[0] == BOS_ID == loaded.bos_token_id
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert loaded.eos_token_id == EOS_ID
    stream = encode_documents(loaded, ["one doc", "two"])
    assert stream.dtype == np.uint16
    assert stream[0] == BOS_ID and stream[-1] == EOS_ID
    assert list(stream).count(BOS_ID) == 2 and list(stream).count(EOS_ID) == 2


# --- trainer ----------------------------------------------------------------

def _preset(steps: int) -> train.Preset:
    """The tiny preset cut down to ``steps`` steps on ~150 KB of text."""
    tiny = train.PRESETS["tiny"]
    return replace(tiny, train_tokens=steps * tiny.tokens_per_step, warmup_steps=2,
                   checkpoint_every=4, train_chars=150_000)


def _train(preset, out_dir, small_corpus, **kwargs):
    return train.train_reference(preset, out_dir, corpus_dir=small_corpus, eval_tokens=2048,
                                 show_progress=False, **kwargs)


def test_preset_widths_suit_k_quants_and_group_128():
    for preset in train.PRESETS.values():
        for width in (preset.vocab_size, preset.hidden_size, preset.intermediate_size):
            assert width % 256 == 0, (preset.name, width)
        assert preset.hidden_size // preset.num_heads == 64


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    preset = train.PRESETS["small"]
    assert train.learning_rate(preset, 0, 0.0) < train.learning_rate(preset, 99, 0.0) == preset.learning_rate
    assert train.learning_rate(preset, 4000, 1.0) == pytest.approx(0.1 * preset.learning_rate)


def test_window_sampler_is_a_pure_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = token_windows.WindowSampler(tokens, 9, 4, seed=1), token_windows.WindowSampler(tokens, 9, 4, seed=1)
    assert torch.equal(a.batch(30), b.batch(30)) and torch.equal(a.batch(2), b.batch(2))
    first_epoch = torch.cat([a.batch(step)[:, 0] for step in range(a.num_windows // 4)])
    assert len(set(first_epoch.tolist())) == len(first_epoch)  # no window repeats within an epoch


def test_training_reduces_loss_and_writes_a_loadable_checkpoint(small_corpus, tmp_path):
    from transformers import MixtralForCausalLM

    preset = _preset(40)
    result = _train(preset, tmp_path, small_corpus)
    assert result.status == "completed" and result.step == 40
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5]) - 0.5

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).exists(), name
    # transformers 5 fuses experts in memory but saves Mixtral's per-expert
    # names, which is what vLLM's Mixtral loader and llama.cpp expect.
    names = load_file(tmp_path / "model.safetensors").keys()
    assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in names
    assert not any("gate_up_proj" in name for name in names)

    metrics = json.loads((tmp_path / train.METRICS_FILE).read_text())
    assert metrics == result.metrics
    assert metrics["eval"]["perplexity"] < metrics["eval"]["unigram_perplexity"]
    # The reloaded checkpoint reproduces the reported perplexity.
    model = MixtralForCausalLM.from_pretrained(tmp_path)
    valid = encode_documents(load_tokenizer(tmp_path), corpus.load_split("valid", small_corpus))
    windows = token_windows.eval_windows(valid, preset.seq_len, 2048)
    assert token_windows.perplexity(model, windows) == pytest.approx(metrics["eval"]["perplexity"], rel=1e-4)


def test_resumed_run_matches_an_uninterrupted_one(small_corpus, tmp_path):
    preset = _preset(10)
    paused = _train(preset, tmp_path / "resumed", small_corpus, max_steps=6)
    assert paused.status == "stopped" and paused.step == 6
    resumed = _train(preset, tmp_path / "resumed", small_corpus)
    straight = _train(preset, tmp_path / "straight", small_corpus)
    assert resumed.status == "completed" and resumed.step == 10
    assert resumed.losses[:6] == paused.losses
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-5)
    resumed_weights = load_file(tmp_path / "resumed" / "model.safetensors")
    straight_weights = load_file(tmp_path / "straight" / "model.safetensors")
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, atol=1e-5, rtol=1e-4)


def test_resume_refuses_a_different_preset(small_corpus, tmp_path):
    _train(_preset(10), tmp_path, small_corpus, max_steps=1)
    with pytest.raises(ValueError, match="different preset"):
        _train(_preset(20), tmp_path, small_corpus)


def test_ctrl_c_stops_after_the_step_and_checkpoints(small_corpus, tmp_path, monkeypatch):
    batch = token_windows.WindowSampler.batch
    handler_before = signal.getsignal(signal.SIGINT)

    def batch_then_interrupt(self, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return batch(self, step)

    monkeypatch.setattr(token_windows.WindowSampler, "batch", batch_then_interrupt)
    result = _train(_preset(10), tmp_path, small_corpus)
    assert result.status == "interrupted" and result.step == 4
    saved = torch.load(tmp_path / train.STATE_DIR / train.CHECKPOINT_FILE, weights_only=False)
    assert saved["state"]["step"] == 4
    assert signal.getsignal(signal.SIGINT) is handler_before


def test_time_budget_ends_training_early_and_still_evaluates(small_corpus, tmp_path):
    result = _train(_preset(10_000), tmp_path, small_corpus, max_minutes=0.05)
    assert result.status == "completed" and 0 < result.step < 10_000
    assert result.metrics["eval"]["perplexity"] > 0
