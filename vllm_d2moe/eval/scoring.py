"""Score held-out windows through vLLM: per-token NLL, and KL divergence and
top-1 agreement against the first (reference) model.

Each window is sent as a token prompt with ``prompt_logprobs=-1``: vLLM returns
the log-probability of every vocabulary token at every prompt position
(position ``i`` predicting token ``i`` from tokens ``< i``), so KL divergence
is exact over the full vocabulary, not a top-k approximation. The reference
model's distributions are kept in memory (``windows x window x vocab`` float32:
512 MiB for 16,384 tokens of an 8,192-token vocabulary) and every later model
is compared with them position by position.

Engines run in a fresh process (vLLM may spawn helpers, which needs a
``__main__`` module, and its start-up state is not meant to be reused):
:func:`score_with_vllm` runs ``python -m vllm_d2moe.eval.scoring
JOB.json OUT_DIR`` and the engines run one after another in that process
(vLLM is imported once). ``OUT_DIR`` gets ``scores.npz`` (``NAME/nll``,
``NAME/kl``, ``NAME/top1``, each ``[windows, window]``) and ``engines.json``
(start-up and scoring seconds, or the error, per model).
"""

import gc
import json
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from vllm_d2moe import engine_stats
from vllm_d2moe.eval.variants import Variant
from vllm_d2moe.vllm_glue.llm import start_llm

SCORES_FILE = "scores.npz"
ENGINES_FILE = "engines.json"
REFERENCE_FILE = "reference_logprobs.npy"  # [windows, window, vocab] float32, only when asked for
# Windows per generate() call: vLLM materialises full-vocabulary prompt logprobs
# as Python lists (about 170 MB per 256-token window of an 8,192-token vocabulary).
BATCH_WINDOWS = 4


@dataclass(frozen=True)
class TokenScores:
    """Per scored token (``[windows, window]``): NLL of the true token, KL(reference || model)
    of the next-token distributions, and whether both models rank the same token first."""

    nll: np.ndarray
    kl: np.ndarray
    top1: np.ndarray

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll.mean(dtype=np.float64))

    @property
    def mean_kl(self) -> float:
        return float(self.kl.mean(dtype=np.float64))

    @property
    def top1_agreement(self) -> float:
        return float(self.top1.mean(dtype=np.float64))


SCORE_KEYS = tuple(f.name for f in fields(TokenScores))


def _dense_logprobs(prompt_logprobs, window: int) -> tuple[np.ndarray, np.ndarray]:
    """``([window, vocab] log-probs, [window] log-prob of the prompt token)`` from vLLM's
    flat prompt logprobs: per position the prompt token first, then every token by rank."""
    ids = np.asarray(prompt_logprobs.token_ids, dtype=np.int64).reshape(window, -1)
    logprobs = np.asarray(prompt_logprobs.logprobs, dtype=np.float32).reshape(window, -1)
    dense = np.empty((window, ids.shape[1] - 1), dtype=np.float32)
    np.put_along_axis(dense, ids[:, 1:], logprobs[:, 1:], axis=1)
    return dense, logprobs[:, 0]


def _score_batches(llm, windows: torch.Tensor):
    """Yield ``(dense log-probs [b, window, vocab], target log-probs [b, window])`` per batch."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    window = windows.shape[1] - 1
    params = SamplingParams(
        max_tokens=1, temperature=0.0, prompt_logprobs=-1, detokenize=False, flat_logprobs=True
    )
    for chunk in windows.split(BATCH_WINDOWS):
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=w.tolist()) for w in chunk], params, use_tqdm=False
        )
        dense, target = zip(*(_dense_logprobs(o.prompt_logprobs, window) for o in outputs))
        yield np.stack(dense), np.stack(target)


def _start_engine(variant: Variant, dtype: str, window: int):
    return start_llm(
        variant.model,
        quantization=variant.quantization,
        hf_overrides=variant.hf_overrides,
        dtype=dtype,
        enforce_eager=True,
        # No worker process: spawning one re-imports vLLM, a third of an engine's start-up here.
        distributed_executor_backend="uni",
        max_model_len=window + 2,  # the window's window + 1 tokens and the one generated token
        max_logprobs=-1,
        enable_prefix_caching=False,
    )


def _compare(llm, windows: torch.Tensor, reference: np.ndarray | None) -> tuple[TokenScores, np.ndarray]:
    """Score every window with ``llm`` against ``reference`` (all windows' log-probs).

    With ``reference`` None this model is the reference: its log-probs are
    collected and returned for the models after it.
    """
    return compare_batches(_score_batches(llm, windows), windows.shape[0], windows.shape[1] - 1, reference)


def compare_batches(batches, count: int, window: int, reference: np.ndarray | None) -> tuple[TokenScores, np.ndarray]:
    """Scores of ``batches`` (``(dense log-probs [b, window, vocab], target log-probs [b, window])``
    covering ``count`` windows in order) against ``reference``; with ``reference`` None the batches
    are the reference, collected and returned. Any engine's log-probs can be compared this way."""
    is_reference = reference is None
    nll = np.empty((count, window), dtype=np.float32)
    kl = np.empty((count, window), dtype=np.float64)
    top1 = np.empty((count, window), dtype=bool)
    first = 0
    for dense, target in batches:
        rows = slice(first, first + len(dense))
        first += len(dense)
        if is_reference:
            if reference is None:
                reference = np.empty((count, window, dense.shape[-1]), dtype=np.float32)
            reference[rows] = dense
        ref = reference[rows]
        nll[rows] = -target
        kl[rows] = np.sum(np.exp(ref) * (ref - dense), axis=-1, dtype=np.float64)
        top1[rows] = ref.argmax(-1) == dense.argmax(-1)
    return TokenScores(nll, kl, top1), reference


def _width_histogram(llm) -> dict[int, int]:
    """Pairs served at each width over all layers (asked from the engine's first worker)."""
    total: dict[int, int] = {}
    for hist in engine_stats(llm)[0]["widths"]["per_layer"].values():
        for bits, pairs in hist.items():
            total[bits] = total.get(bits, 0) + pairs
    return dict(sorted(total.items()))


def score_all(
    variants: list[Variant], windows: torch.Tensor, dtype: str, out_dir: Path, save_reference: bool = False
) -> None:
    """Score every variant (the first is the reference) and write ``out_dir``'s two files (and with
    ``save_reference`` the reference's log-probs, ``REFERENCE_FILE``, for engines scored elsewhere)."""
    reference = None
    arrays, engines = {}, {}
    for variant in variants:
        try:
            started = time.monotonic()
            llm = _start_engine(variant, dtype, windows.shape[1] - 1)
            timing = {"start_seconds": round(time.monotonic() - started, 1)}
            started = time.monotonic()
            engine_stats(llm, reset=True)  # not vLLM's warm-up passes
            try:
                scores, reference = _compare(llm, windows, reference)
                timing["width_histogram"] = _width_histogram(llm)
            finally:
                llm.llm_engine.engine_core.shutdown()
                del llm
                gc.collect()
            timing["score_seconds"] = round(time.monotonic() - started, 1)
        except Exception as e:  # recorded so one failed engine doesn't hide the others
            traceback.print_exc()
            engines[variant.name] = {"error": f"{type(e).__name__}: {e}"}
            if reference is None:
                break  # nothing can be compared without the reference
            continue
        if save_reference and variant is variants[0]:
            np.save(out_dir / REFERENCE_FILE, reference)
        engines[variant.name] = timing
        arrays.update({f"{variant.name}/{key}": getattr(scores, key) for key in SCORE_KEYS})
        print(
            f"d2moe eval: {variant.name}: perplexity {scores.perplexity:.3f}, engine start "
            f"{timing['start_seconds']} s, scoring {timing['score_seconds']} s",
            flush=True,
        )
    np.savez(out_dir / SCORES_FILE, **arrays)
    (out_dir / ENGINES_FILE).write_text(json.dumps(engines, indent=1) + "\n")


def score_with_vllm(
    variants: list[Variant], windows: torch.Tensor, dtype: str, work_dir: Path, save_reference: bool = False
) -> tuple[dict[str, TokenScores], dict[str, dict]]:
    """Run :func:`score_all` in a fresh process; return scores and engine records by model name."""
    work_dir.mkdir(parents=True, exist_ok=True)
    np.save(work_dir / "windows.npy", windows.numpy())
    job = {"windows": str(work_dir / "windows.npy"), "dtype": dtype, "variants": [asdict(v) for v in variants],
           "save_reference": save_reference}
    (work_dir / "scoring-job.json").write_text(json.dumps(job, indent=1))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB reserved per engine; vLLM's default is larger
    # The engine core runs in the scoring process, not vLLM's default spawned one: the
    # full-vocabulary prompt log-probs (Python floats, about 170 MB per window) are then not
    # serialised between processes, and start-up skips two vLLM imports.
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_d2moe.eval.scoring", str(work_dir / "scoring-job.json"), str(work_dir)],
        env=env,
    )
    if proc.returncode != 0 or not (work_dir / ENGINES_FILE).exists():
        raise RuntimeError(f"vLLM scoring process failed (exit {proc.returncode}); see its output above")
    engines = json.loads((work_dir / ENGINES_FILE).read_text())
    with np.load(work_dir / SCORES_FILE) as arrays:
        scores = {
            v.name: TokenScores(*(arrays[f"{v.name}/{key}"] for key in SCORE_KEYS))
            for v in variants
            if "error" not in engines.get(v.name, {"error": "not run"})
        }
    return scores, engines


def main(job_path: str, out_dir: str) -> None:
    job = json.loads(Path(job_path).read_text())
    windows = torch.from_numpy(np.load(job["windows"]))
    score_all([Variant(**v) for v in job["variants"]], windows, job["dtype"], Path(out_dir),
              job.get("save_reference", False))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
