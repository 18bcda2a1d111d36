"""A benchmark whose engine fails prints the exception that stopped it (type, message, traceback),
records it as that engine's error in its results JSON, and goes on with the next engine.

Runs ``benchmarks/budget_sweep.py`` as a user would, on the embedded reference model, with a prompt
longer than the model's context (1024 positions): vLLM's ModelConfig refuses that at engine creation, before any
weights load, so each engine fails within its import time.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_budget_sweep_prints_and_records_the_exception_of_each_failed_engine(tmp_path):
    options = "--methods bf16 int8-resident --concurrency 1 --repeats 1 --input-len 1100 --output-len 2"
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "budget_sweep.py"),
        *options.split(),
    ]
    command += [
        "--cache",
        str(tmp_path / "cache"),
        "--results-dir",
        str(tmp_path),
        "--name",
        "errors",
    ]
    proc = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[
        -3000:
    ]  # a failed engine does not stop the benchmark

    report = json.loads((tmp_path / "errors.json").read_text())
    assert [r["method"] for r in report["results"]] == ["bf16", "int8-resident"]
    for row in report["results"]:
        assert "rows" not in row
        assert (
            row["error"].startswith("ValidationError: ")
            and "max_model_len" in row["error"]
        )
        exception = row["exception"]
        assert (
            exception["type"] == "ValidationError"
        )  # pydantic's, from vLLM's ModelConfig
        assert exception["traceback"].startswith("Traceback (most recent call last):")
        assert (
            "in run_engine" in exception["traceback"]
        )  # the worker's frames, not only the last line

    printed = proc.stdout
    assert printed.count("FAILED: ValidationError: ") == 2
    assert printed.count("Traceback (most recent call last):") >= 2
    assert "max_model_len" in printed
