"""Train a d2moe checkpoint's ``learned`` expert predictor offline.

    d2moe train-predictor CKPT [--depth 3] [--tokens 65536]

The checkpoint runs as served at a fixed width (the transformers simulation,
no engine) over calibration text (default the reference corpus's train
split); hooks capture every MoE layer's input and router logits
(:mod:`vllm_d2moe.prefetch.capture`). Each (layer, later layer) correction of
:class:`~vllm_d2moe.prefetch.learned.LearnedPredictor` is then fitted on its
own: the KL divergence from the later layer's true router distribution to the
predicted one, Adam, seeded minibatches. It takes about a minute on the
reference model, so there is no resume: an interrupted run is simply rerun.
The result is ``CKPT/d2moe/predictor.safetensors``.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from vllm_d2moe.mwq.checkpoint import CheckpointError
from vllm_d2moe.prefetch.capture import Capture, capture, load_capture_model
from vllm_d2moe.prefetch.gates import CheckpointGates
from vllm_d2moe.prefetch.learned import LearnedPredictor


def training_pairs(predictor: LearnedPredictor, cap: Capture) -> dict[tuple[int, int], tuple]:
    """Per (layer, later layer): the predictor's input (``later``'s norm of the state the expert op of
    ``layer`` sees), the ``gate`` logits of it, and ``later``'s true router logits, ``[tokens, ...]``."""
    gates = predictor.gates
    pairs = {}
    for layer, later in predictor.corrections:
        hidden = gates.residual_direction(layer, cap.moe_input[layer].flatten(0, 1))
        x = gates.moe_input(later, hidden)
        pairs[(layer, later)] = (x, gates.logits(later, x), gates.logits(later, cap.moe_input[later].flatten(0, 1)))
    return pairs


def fit(predictor: LearnedPredictor, cap: Capture, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """Fit every correction in place; returns the first and last minibatch loss per pair."""
    history = {}
    for (layer, later), (x, gate_logits, target) in training_pairs(predictor, cap).items():
        correction = predictor.corrections[(layer, later)].requires_grad_(True)
        optimizer = torch.optim.Adam(correction.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed * 1000 + layer * 100 + later)
        target_log_probs = target.log_softmax(-1)
        losses = []
        for _ in range(steps):
            rows = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
            predicted = (gate_logits[rows] + correction(x[rows])).log_softmax(-1)
            loss = torch.nn.functional.kl_div(predicted, target_log_probs[rows], log_target=True,
                                              reduction="batchmean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        correction.requires_grad_(False)
        history[f"{layer}->{later}"] = {"first_loss": losses[0], "last_loss": losses[-1]}
    return history


def train_predictor(checkpoint: Path, windows: torch.Tensor, depth: int, width: int, steps: int,
                    batch_size: int, lr: float, seed: int, bits: int | None = None) -> Path:
    """Capture ``windows [n, T]`` on ``checkpoint`` served at ``bits``, fit, and save the predictor."""
    started = time.monotonic()
    torch.manual_seed(seed)
    gates = CheckpointGates(checkpoint)
    predictor = LearnedPredictor.untrained(gates, depth, width)
    model = load_capture_model(checkpoint, bits)
    cap = capture(model, gates, windows)
    del model
    history = fit(predictor, cap, steps, batch_size, lr, seed)
    training = {"tokens": windows.numel(), "depth": depth, "width": width, "steps": steps,
                "batch_size": batch_size, "lr": lr, "seed": seed, "bits": bits, "history": history,
                "seconds": round(time.monotonic() - started, 1)}
    return predictor.save(checkpoint, training)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="d2moe checkpoint directory (from `d2moe convert`)")
    parser.add_argument("--calib", default="corpus:train",
                        help="calibration text: a UTF-8 file, or corpus:SPLIT of the reference corpus (default "
                             "corpus:train)")
    parser.add_argument("--calib-chars", type=int, default=1_000_000)
    parser.add_argument("--tokens", type=int, default=65536, help="calibration tokens captured (default 65536)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3, help="MoE layers ahead to predict (default 3)")
    parser.add_argument("--width", type=int, default=256, help="hidden width of each correction (default 256)")
    parser.add_argument("--steps", type=int, default=1500, help="minibatches per (layer, later layer) pair")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bits", type=int, default=None, help="served width of the experts (default the widest)")


def run(args) -> int:
    from vllm_d2moe.router.train import calibration_tokens
    from vllm_d2moe.token_windows import eval_windows

    try:
        stream = calibration_tokens(args.checkpoint, args.calib, args.calib_chars)
        windows = eval_windows(stream, args.window, args.tokens)[:, :-1]
        path = train_predictor(args.checkpoint, windows, args.depth, args.width, args.steps, args.batch_size,
                               args.lr, args.seed, args.bits)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"train-predictor: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
