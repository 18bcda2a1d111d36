"""Train the reference MoE language model (Mixtral architecture) on the docs corpus.

Plain PyTorch loop: AdamW, linear warmup then cosine decay to 10 % of the peak
learning rate, gradient clipping, Switch-style load-balancing loss on the
routers.  Seeded and reproducible: batch ``k`` depends only on ``(seed, k)``,
so a resumed run follows the same trajectory as an uninterrupted one (for the
same thread count).

Output directory layout::

    config.json, generation_config.json, model.safetensors   HF checkpoint (fp32)
    tokenizer.json, tokenizer_config.json                    byte-level BPE
    reference_metrics.json        held-out perplexities, written on completion
    train_state/checkpoint.pt     weights + optimizer + progress, for resuming

The HF files are rewritten at every checkpoint, so the directory is always a
loadable model.  Rerunning the same command resumes from ``train_state``.
Ctrl-C (or SIGTERM) stops after the current step and checkpoints; a second
Ctrl-C aborts immediately.

``--max-minutes`` bounds the training time.  The learning-rate schedule then
follows whichever budget (tokens or time) is further along, so the model always
ends with a decayed learning rate; a run that hits the time budget is not
bit-reproducible.

CLI: ``python -m vllm_d2moe.reference.train --preset small --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import MixtralConfig, MixtralForCausalLM

from vllm_d2moe.reference import corpus
from vllm_d2moe.reference.tokenizer import (
    BOS_ID,
    EOS_ID,
    encode_documents,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from vllm_d2moe.stop_signal import stop_on_signal
from vllm_d2moe.token_windows import WindowSampler, eval_windows, perplexity

logger = logging.getLogger(__name__)

STATE_DIR = "train_state"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "reference_metrics.json"
DEFAULT_EVAL_TOKENS = 65536


@dataclass(frozen=True)
class Preset:
    """Model shape and training budget.

    Widths are multiples of 256 so llama.cpp K-quants (256-wide super-blocks)
    and group-128 quantization apply to every linear layer.
    """

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_experts: int
    experts_per_token: int
    max_position: int
    seq_len: int
    batch_size: int
    train_tokens: int
    learning_rate: float
    warmup_steps: int
    checkpoint_every: int
    # Train the tokenizer and model on only this many characters of the train
    # split (None: all of it); keeps the tiny preset fast.
    train_chars: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    router_aux_loss_coef: float = 0.01

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        return math.ceil(self.train_tokens / self.tokens_per_step)


PRESETS = {
    # ~1 minute on one core; for tests and smoke runs.
    "tiny": Preset(
        name="tiny", vocab_size=2048, hidden_size=256, intermediate_size=256, num_layers=2,
        num_heads=4, num_experts=8, experts_per_token=2, max_position=512, seq_len=128,
        batch_size=8, train_tokens=256 * 8 * 128, learning_rate=2e-3, warmup_steps=30,
        checkpoint_every=100, train_chars=4_000_000,
    ),
    # The benchmark model: 17.8M parameters, ~2,500 tok/s on 2 cores (~1,450 on 1),
    # so the 8.4M-token budget (about one epoch) takes ~1 hour on 2 cores.
    "small": Preset(
        name="small", vocab_size=8192, hidden_size=256, intermediate_size=512, num_layers=4,
        num_heads=4, num_experts=8, experts_per_token=2, max_position=1024, seq_len=256,
        batch_size=8, train_tokens=4096 * 8 * 256, learning_rate=1e-3, warmup_steps=100,
        checkpoint_every=200,
    ),
}


@dataclass
class TrainingResult:
    status: str  # "completed", "stopped" (max_steps reached) or "interrupted"
    step: int
    losses: list[float] = field(default_factory=list)
    metrics: dict | None = None


def mixtral_config(preset: Preset) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        head_dim=preset.hidden_size // preset.num_heads,
        # Full multi-head attention keeps k/v projections 256 wide as well.
        num_key_value_heads=preset.num_heads,
        num_local_experts=preset.num_experts,
        num_experts_per_tok=preset.experts_per_token,
        max_position_embeddings=preset.max_position,
        # Mixtral's default theta is 1e6; 1e4 suits contexts of a few hundred
        # tokens and is what converters assume when the field is not found.
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        sliding_window=None,
        tie_word_embeddings=False,
        router_aux_loss_coef=preset.router_aux_loss_coef,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        dtype="float32",
    )


def learning_rate(preset: Preset, step: int, progress: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from peak to 10 % at progress 1."""
    warmup = min(1.0, (step + 1) / preset.warmup_steps)
    cosine = 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return preset.learning_rate * warmup * cosine


def unigram_perplexity(train_tokens: np.ndarray, windows: torch.Tensor, vocab_size: int) -> float:
    """Baseline: train-set token frequencies with add-one smoothing, same targets."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return math.exp(-log_probs[windows[:, 1:].numpy()].mean())


def train_reference(
    preset: str | Preset,
    out_dir: str | Path,
    *,
    threads: int | None = None,
    max_minutes: float | None = None,
    max_steps: int | None = None,
    seed: int = 0,
    corpus_dir: str | Path | None = None,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    show_progress: bool = True,
) -> TrainingResult:
    """Train (or resume) a reference model into ``out_dir``.

    ``max_steps`` pauses the run after that many optimizer steps (checkpointed,
    resumable) without shortening the learning-rate schedule.
    """
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
        os.environ["RAYON_NUM_THREADS"] = str(threads)  # tokenizers' encoder pool
    corpus_dir = corpus.ensure_corpus(Path(corpus_dir) if corpus_dir else None)

    train_texts = (
        corpus.load_slice("train", preset.train_chars, corpus_dir)
        if preset.train_chars
        else corpus.load_split("train", corpus_dir)
    )
    if (out_dir / "tokenizer.json").exists():
        tokenizer = load_tokenizer(out_dir)
    else:
        logger.info("training a %d-token BPE vocabulary", preset.vocab_size)
        tokenizer = train_tokenizer(train_texts, preset.vocab_size, preset.max_position)
        save_tokenizer(tokenizer, out_dir)
    logger.info("encoding corpus")
    train_tokens = encode_documents(tokenizer, train_texts)
    valid_tokens = encode_documents(tokenizer, corpus.load_split("valid", corpus_dir))
    logger.info("train stream: %d tokens, valid stream: %d tokens", len(train_tokens), len(valid_tokens))

    torch.manual_seed(seed)
    model = MixtralForCausalLM(mixtral_config(preset))
    optimizer = _make_optimizer(model, preset)
    state = {"preset": asdict(preset), "seed": seed, "step": 0, "elapsed_seconds": 0.0, "losses": []}
    checkpoint_path = out_dir / STATE_DIR / CHECKPOINT_FILE
    if checkpoint_path.exists():
        state = _restore(checkpoint_path, model, optimizer, state)
        logger.info("resuming from step %d", state["step"])

    sampler = WindowSampler(train_tokens, preset.seq_len, preset.batch_size, seed)
    time_budget = max_minutes * 60 if max_minutes else math.inf
    stop_step = min(preset.total_steps, max_steps) if max_steps else preset.total_steps
    status = _train_loop(model, optimizer, sampler, preset, state, out_dir, time_budget, stop_step, show_progress)
    if status != "completed":
        return TrainingResult(status, state["step"], state["losses"])

    logger.info("evaluating on %d validation tokens", eval_tokens)
    windows = eval_windows(valid_tokens, preset.seq_len, eval_tokens)
    metrics = {
        "preset": preset.name,
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": state["step"],
        "train_tokens": state["step"] * preset.tokens_per_step,
        "train_minutes": round(state["elapsed_seconds"] / 60, 2),
        "tokens_per_second": round(state["step"] * preset.tokens_per_step / max(state["elapsed_seconds"], 1e-9)),
        "threads": torch.get_num_threads(),
        "final_train_loss": float(np.mean(state["losses"][-50:])),
        "eval": {
            "split": "valid",
            "tokens": windows[:, 1:].numel(),
            "context": preset.seq_len,
            "perplexity": perplexity(model, windows),
            "unigram_perplexity": unigram_perplexity(train_tokens, windows, preset.vocab_size),
        },
        "corpus": corpus.read_manifest(corpus_dir),
    }
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("validation perplexity %.2f (unigram %.1f)", metrics["eval"]["perplexity"],
                metrics["eval"]["unigram_perplexity"])
    return TrainingResult(status, state["step"], state["losses"], metrics)


def _make_optimizer(model: torch.nn.Module, preset: Preset) -> torch.optim.AdamW:
    # Decay matrices (embeddings, projections, experts, routers), not norm gains.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": preset.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=preset.learning_rate, betas=(0.9, 0.95))


def _restore(path: Path, model, optimizer, fresh_state: dict) -> dict:
    saved = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("preset", "seed"):
        if saved["state"][key] != fresh_state[key]:
            raise ValueError(
                f"{path} belongs to a run with a different {key} "
                f"({saved['state'][key]!r}); use a fresh output directory"
            )
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return saved["state"]


def _save(out_dir: Path, model, optimizer, state: dict) -> None:
    state_dir = out_dir / STATE_DIR
    state_dir.mkdir(exist_ok=True)
    tmp = state_dir / (CHECKPOINT_FILE + ".tmp")
    torch.save({"state": state, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp)
    os.replace(tmp, state_dir / CHECKPOINT_FILE)  # atomic: a crash never leaves a torn checkpoint
    model.save_pretrained(out_dir)


def _train_loop(model, optimizer, sampler, preset, state, out_dir, time_budget, stop_step, show_progress) -> str:
    """Run steps until a budget, ``stop_step`` or a stop signal; checkpoint on exit."""
    model.train()
    session_start = last_tick = time.monotonic()
    session_tokens = 0
    bar = tqdm(
        total=preset.total_steps, initial=state["step"], unit="step", disable=not show_progress,
        dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 60.0,
    )
    with stop_on_signal() as stop_requested:
        while True:
            now = time.monotonic()
            state["elapsed_seconds"] += now - last_tick  # includes checkpoint time
            last_tick = now
            progress = max(state["step"] / preset.total_steps, state["elapsed_seconds"] / time_budget)
            if progress >= 1.0:
                status = "completed"
                break
            if stop_requested.is_set():
                status = "interrupted"
                break
            if state["step"] >= stop_step:
                status = "stopped"
                break
            lr = learning_rate(preset, state["step"], progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = sampler.batch(state["step"])
            output = model(input_ids=batch[:, :-1], output_router_logits=True)
            loss = F.cross_entropy(output.logits.flatten(0, 1), batch[:, 1:].flatten())
            (loss + preset.router_aux_loss_coef * output.aux_loss).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), preset.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            state["step"] += 1
            state["losses"].append(loss.item())
            session_tokens += preset.tokens_per_step
            bar.update(1)
            bar.set_postfix(
                loss=f"{np.mean(state['losses'][-20:]):.3f}", lr=f"{lr:.2e}",
                tok_s=f"{session_tokens / (time.monotonic() - session_start):.0f}", refresh=False,
            )
            if state["step"] % preset.checkpoint_every == 0:
                _save(out_dir, model, optimizer, state)
                bar.write(f"checkpoint at step {state['step']}, loss {np.mean(state['losses'][-50:]):.3f}")
    bar.close()
    _save(out_dir, model, optimizer, state)
    if status == "interrupted":
        logger.warning("stopped at step %d; rerun the same command to resume", state["step"])
    return status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--out", type=Path, required=True, help="output (and resume) directory")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="training time budget; the LR schedule shortens to fit it")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="pause after this many steps (resumable; schedule unchanged)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus-dir", type=Path, default=None, help="default: $D2MOE_CACHE/corpus")
    parser.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = train_reference(
        args.preset, args.out, threads=args.threads, max_minutes=args.max_minutes,
        max_steps=args.max_steps, seed=args.seed, corpus_dir=args.corpus_dir, eval_tokens=args.eval_tokens,
    )
    if result.metrics:
        print(json.dumps(result.metrics["eval"], indent=2))
    return 130 if result.status == "interrupted" else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the D2MoE reference MoE language model.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
