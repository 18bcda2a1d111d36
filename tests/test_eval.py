"""The accuracy harness (``d2moe eval``) and the zero-shot lm-eval task.

End to end on a briefly trained tiny reference model: one harness run with
six vLLM engines (unquantized; MWQ, RTN at 2 and 8 bits; INT8), started in one
process (a few seconds each after the first), shared by the tests below.
"""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from vllm_d2moe import cli
from vllm_d2moe.eval.fake_quant import (
    int8_fake_quantize,
    rtn_fake_quantize,
    write_fake_quantized,
)
from vllm_d2moe.eval.zero_shot.next_lines import NUM_CHOICES, TASK_NAME, build_task
from vllm_d2moe.reference import corpus, train
from vllm_d2moe.testing.tiny_models import make_tiny_model

WIDTHS = (2, 8)
GROUP_SIZE = 128


# --- baselines ----------------------------------------------------------------


def test_rtn_matches_group_min_max_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(6, 32) * torch.linspace(0.1, 3.0, 32)
    bits, group = 3, 8
    levels = 2**bits - 1
    expected = torch.empty_like(w)
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], group):
            x = w[r, g : g + group].double()
            scale = float(np.float16((x.max() - x.min()) / levels))
            zero = float(np.float16(-x.min() / scale))
            q = torch.clamp(torch.round(x / scale + zero), 0, levels)
            expected[r, g : g + group] = (scale * (q - zero)).float()
    torch.testing.assert_close(rtn_fake_quantize(w, bits, group), expected, rtol=0, atol=1e-6)


def test_int8_is_symmetric_per_output_row():
    torch.manual_seed(0)
    w = torch.randn(5, 64) * torch.arange(1, 6).unsqueeze(1)
    w[2] = 0.0
    out = int8_fake_quantize(w)
    scale = torch.from_numpy((w.abs().amax(1).numpy() / 127).astype(np.float16)).double().unsqueeze(1)
    codes = out.double() / torch.where(scale > 0, scale, torch.ones_like(scale))
    assert torch.equal(out[2], torch.zeros(64))
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    assert codes.abs().max() <= 127
    assert (out - w).abs().max(1).values.le(scale.squeeze(1) / 2 + 1e-6).all()


def test_fake_quantized_checkpoint_replaces_only_routed_experts(tmp_path):
    src = make_tiny_model("mixtral", tmp_path / "src")  # bfloat16, per-expert tensors
    replaced = write_fake_quantized(src, tmp_path / "rtn", lambda w: rtn_fake_quantize(w, 2, 64))
    before = load_file(src / "model.safetensors")
    after = load_file(tmp_path / "rtn" / "model.safetensors")
    experts = [n for n in before if ".experts." in n]
    assert replaced == len(experts) == 2 * 8 * 3
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype
        if name in experts:
            assert torch.equal(after[name], rtn_fake_quantize(tensor, 2, 64).to(tensor.dtype))
        else:
            assert torch.equal(after[name], tensor)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "rtn" / name).read_bytes() == (src / name).read_bytes()


# --- end to end on a trained tiny reference model ------------------------------------


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    """The tiny preset, 100 steps on 1 MB of text (30-50 s): enough for quantization to show."""
    tiny = train.PRESETS["tiny"]
    preset = replace(tiny, train_tokens=100 * tiny.tokens_per_step, warmup_steps=10, train_chars=1_000_000)
    out = tmp_path_factory.mktemp("reference") / "tiny"
    threads = torch.get_num_threads()
    try:
        train.train_reference(preset, out, threads=1, eval_tokens=1024, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def harness(trained_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    argv = ["eval", str(trained_model), "--out", str(tmp / "report"), "--tokens", "2048", "--window", "128",
            "--widths", *map(str, WIDTHS), "--group-size", str(GROUP_SIZE)]
    status = cli.main(argv)
    report = json.loads((tmp / "report" / "accuracy.json").read_text())
    return {"status": status, "out": tmp / "report", "report": report,
            "rows": {row["name"]: row for row in report["variants"]}}


@pytest.mark.slow
def test_harness_writes_table_json_and_plot(harness, report):
    assert harness["status"] == 0
    assert set(harness["rows"]) == {"unquantized", "mwq-2", "mwq-8", "rtn-2", "rtn-8", "int8"}
    assert all("error" not in row for row in harness["rows"].values())
    table = (harness["out"] / "accuracy.md").read_text()
    for name in harness["rows"]:
        assert f"| {name} |" in table
    assert (harness["out"] / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert harness["report"]["setup"]["tokens"] == 2048
    for name, row in harness["rows"].items():
        report.add(f"eval {name:12s} ppl {row['perplexity']:8.3f}  KL {row['kl']:.2e}  top-1 "
                   f"{row['top1_agreement']:.1%}  engine start {row['start_seconds']} s")


@pytest.mark.slow
def test_vllm_and_transformers_perplexities_agree(harness):
    check = harness["report"]["crosscheck"]
    assert check["ok"]
    assert abs(check["relative_difference"]) <= 0.005


@pytest.mark.slow
def test_widest_mwq_width_is_within_1_percent_of_unquantized(harness):
    rows = harness["rows"]
    assert abs(rows["mwq-8"]["perplexity"] / rows["unquantized"]["perplexity"] - 1) <= 0.01


@pytest.mark.slow
def test_lowest_width_is_worse_than_widest(harness):
    low, high = harness["rows"]["mwq-2"], harness["rows"]["mwq-8"]
    assert low["perplexity"] > high["perplexity"]
    assert low["kl"] > 10 * high["kl"]
    assert low["top1_agreement"] < high["top1_agreement"]


@pytest.mark.slow
def test_lowest_mwq_width_equals_round_to_nearest(harness):
    # MWQ's base is RTN at min_bits: the same weights, served by the d2moe method
    # and by vLLM's unquantized path over the fake-quantized checkpoint.
    mwq, rtn = harness["rows"]["mwq-2"], harness["rows"]["rtn-2"]
    assert mwq["perplexity"] == pytest.approx(rtn["perplexity"], rel=1e-4)
    assert mwq["kl"] == pytest.approx(rtn["kl"], rel=1e-2)
    assert [row["bits"] for row in harness["report"]["mwq_vs_rtn"]] == list(WIDTHS)


@pytest.mark.slow
def test_baselines_are_close_at_8_bits(harness):
    rows = harness["rows"]
    for name in ("rtn-8", "int8"):
        assert abs(rows[name]["perplexity"] / rows["unquantized"]["perplexity"] - 1) <= 0.01
        assert rows[name]["kl"] < rows["rtn-2"]["kl"] / 10


@pytest.mark.slow
def test_bits_per_weight_include_scales_and_zeros(harness):
    bits = {name: row["bits_per_weight"] for name, row in harness["rows"].items()}
    hidden = inter = 256  # tiny preset: every group boundary is 64-byte aligned
    assert bits["unquantized"] == 32
    assert bits["rtn-2"] == pytest.approx(2 + 32 / 128)
    assert bits["rtn-8"] == pytest.approx(8 + 32 / 128)
    assert bits["mwq-2"] == pytest.approx(2 + 32 / 128)  # the base alone
    assert bits["mwq-8"] == pytest.approx(8 + 32 / 128 + 6 * 4 / 128)  # six sign planes, a 4-bit scale code each
    assert bits["int8"] == pytest.approx(8 + 16 * (2 * inter + hidden) / (3 * inter * hidden))
    assert harness["rows"]["mwq-8"]["hf_overrides"] == {"quantization_config": {"quant_method": "d2moe", "bits": 8}}


# --- zero-shot task -------------------------------------------------------------


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero_shot")
    build_task(out, count=40, seed=0)
    return out


def test_task_items_are_true_continuations_among_distinct_choices(task_dir):
    texts = {doc.id: doc.text for doc in corpus.load_documents("test", corpus.ensure_corpus())}
    rows = [json.loads(line) for line in (task_dir / f"{TASK_NAME}.jsonl").read_text().splitlines()]
    assert len(rows) == 40
    assert len({row["id"] for row in rows}) == 40
    for row in rows:
        assert len(set(row["choices"])) == NUM_CHOICES
        assert 0 <= row["label"] < NUM_CHOICES
        doc_id = row["id"].rsplit(":", 1)[0]
        assert row["context"] + "\n" + row["choices"][row["label"]] in texts[doc_id]
        distractors = [c for i, c in enumerate(row["choices"]) if i != row["label"]]
        assert not any(c in texts[doc_id] for c in distractors)
    labels = [row["label"] for row in rows]
    assert len(set(labels)) == NUM_CHOICES  # the answer's position varies


def test_task_is_deterministic(task_dir, tmp_path):
    build_task(tmp_path, count=40, seed=0)
    name = f"{TASK_NAME}.jsonl"
    assert (tmp_path / name).read_bytes() == (task_dir / name).read_bytes()


def test_task_yaml_points_at_the_dataset(task_dir):
    config = yaml.safe_load((task_dir / f"{TASK_NAME}.yaml").read_text())
    assert config["task"] == TASK_NAME
    assert config["output_type"] == "multiple_choice"
    assert config["target_delimiter"] == "\n"
    data = config["dataset_kwargs"]["data_files"]["test"]
    assert data == str(task_dir / f"{TASK_NAME}.jsonl")


def test_lm_eval_loads_the_task_and_builds_requests(task_dir):
    lm_eval_tasks = pytest.importorskip("lm_eval.tasks", reason="lm-eval is the optional `eval` extra")
    task = lm_eval_tasks.TaskManager(include_path=str(task_dir)).load([TASK_NAME])["tasks"][TASK_NAME]
    task.build_all_requests(rank=0, world_size=1)
    assert len(task.instances) == 40 * NUM_CHOICES
    first = task.instances[0]
    assert first.request_type == "loglikelihood"
    doc = first.doc
    assert first.args == (doc["context"], "\n" + doc["choices"][0])
