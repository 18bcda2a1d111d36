"""``d2moe train-router CKPT``: train the bit-width routers of a d2moe checkpoint offline.

The model is the checkpoint itself in transformers (:mod:`vllm_d2moe.router.simulate`):
every expert dequantized at the candidate widths, everything else frozen; only
the routers learn. Each step samples calibration windows, runs the teacher
(``--teacher`` unquantized model, or the checkpoint at its widest stored
width), then the routed model with a straight-through Gumbel choice of widths
under the per-width capacities, and takes an Adam step on
:func:`vllm_d2moe.router.loss.router_loss`. The Gumbel temperature anneals
from 1 to 0.1, so late steps train on nearly the choices serving makes.

Afterwards the target-bits calibration (average width against score shift,
on held-back calibration windows) is measured and everything is written to
``CKPT/d2moe/router.safetensors``; the expert blobs are not touched.
Seeded; progress bar; ``CKPT/d2moe/router-training.pt`` holds the state every
``--save-every`` steps so an interrupted run (Ctrl-C included) resumes.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vllm_d2moe.mwq.checkpoint import EXPERTS_DIR, CheckpointError, MWQCheckpoint
from vllm_d2moe.router.assign import check_capacities
from vllm_d2moe.router.loss import router_loss
from vllm_d2moe.router.model import KINDS, RouterSet, WidthRouter
from vllm_d2moe.router.policy import ServingWidths
from vllm_d2moe.router.simulate import load_simulated_model, set_mode, simulated_experts
from vllm_d2moe.stop_signal import stop_on_signal
from vllm_d2moe.token_windows import WindowSampler

STATE_FILE = "router-training.pt"
# Wide enough that the ends reach (nearly) all-narrowest and all-widest on trained routers.
CALIBRATION_SHIFTS = np.linspace(-32.0, 32.0, 257)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="d2moe checkpoint directory (from `d2moe convert`)")
    parser.add_argument("--calib", default="corpus:train",
                        help="calibration text: a UTF-8 file, or corpus:SPLIT for the reference corpus "
                             "(default corpus:train)")
    parser.add_argument("--calib-chars", type=int, default=3_000_000, help="characters of calibration text used")
    parser.add_argument("--widths", type=int, nargs="+", default=[2, 3, 4], help="candidate widths (default 2 3 4)")
    parser.add_argument("--capacities", type=float, nargs="+", default=[0.3, 0.4, 0.3],
                        help="per-width capacity fractions, one per width (default 0.3 0.4 0.3)")
    parser.add_argument("--alpha", type=float, default=1e-3, help="weight of the expected-bits term (default 1e-3)")
    parser.add_argument("--kind", choices=KINDS, default="expert",
                        help="one router per expert (the paper's) or one per layer (default expert)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="unquantized model for the KL target (default: the checkpoint at its widest width)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--no-progress", action="store_true")


def calibration_tokens(checkpoint: Path, calib: str, max_chars: int) -> np.ndarray:
    """The calibration text as one token stream (the model's own tokenizer)."""
    from vllm_d2moe.reference import corpus
    from vllm_d2moe.reference.tokenizer import encode_documents, load_tokenizer

    if calib.startswith("corpus:"):
        texts = corpus.load_slice(calib.split(":", 1)[1], max_chars, corpus.ensure_corpus())
    else:
        path = Path(calib)
        if not path.is_file():
            raise FileNotFoundError(f"--calib {calib}: no such file (or use corpus:train)")
        texts = [path.read_text(encoding="utf-8")[:max_chars]]
    return encode_documents(load_tokenizer(checkpoint), texts)


def _teacher(args, model):
    """A function from input ids to teacher logits."""
    if args.teacher is None:
        widest = MWQCheckpoint(args.checkpoint).spec.max_bits

        def logits(ids):
            set_mode(model, f"fixed:{widest}")
            try:
                return model(input_ids=ids).logits
            finally:
                set_mode(model, "train")

        return logits, widest
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    return (lambda ids: teacher(input_ids=ids).logits), None


@torch.no_grad()
def calibrate(model, windows: torch.Tensor, widths: tuple[int, ...]) -> list[tuple[float, float]]:
    """``(shift, average width)`` on ``windows`` with no capacities, shift ascending, average non-increasing."""
    set_mode(model, "serve")
    layers = simulated_experts(model).values()
    saved = {m: m.policy for m in layers}
    for m in layers:
        m.policy = ServingWidths("router", widths)
    scores = []
    for chunk in windows.split(4):
        model(input_ids=chunk)
        scores += [m.probs.log() for m in layers]
    for m in layers:
        m.policy = saved[m]
    scores = torch.cat(scores)
    bits = torch.tensor(widths, dtype=torch.float32)
    table, lowest = [], math.inf
    for shift in CALIBRATION_SHIFTS:
        average = float(bits[(scores - float(shift) * bits).argmax(1)].mean())
        lowest = min(lowest, average)  # argmax ties can wobble; keep the curve monotone
        table.append((float(shift), lowest))
    return table


def train_router(args) -> Path:
    torch.manual_seed(args.seed)
    capacities = check_capacities(args.capacities, len(args.widths), "--capacities")
    widths = tuple(sorted(args.widths))
    if list(widths) != list(args.widths):
        raise ValueError(f"--widths must be ascending, got {args.widths}")
    checkpoint = MWQCheckpoint(args.checkpoint)
    for b in widths:
        checkpoint.spec.check_width(b, "--widths")
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(args.checkpoint).hidden_size
    routers = {
        layer: WidthRouter(entry.num_experts, hidden, len(widths), args.kind)
        for layer, entry in sorted(checkpoint.layers.items())
    }
    policy = ServingWidths("router", widths, capacities)
    extra = [] if args.teacher else [checkpoint.spec.max_bits]
    model = load_simulated_model(args.checkpoint, policy, routers, extra_widths=extra)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for r in routers.values() for p in r.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=args.lr)
    teacher_logits, teacher_bits = _teacher(args, model)

    tokens = calibration_tokens(args.checkpoint, args.calib, args.calib_chars)
    held_back = (args.seq_len + 1) * 32  # calibration of the target shift, never trained on
    sampler = WindowSampler(tokens[:-held_back], args.seq_len, args.batch_size, args.seed)
    calib_windows = torch.from_numpy(tokens[-held_back:].astype(np.int64)).view(32, args.seq_len + 1)[:, :-1]

    # What a resumed run must share with the interrupted one (more steps may be asked for).
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("no_progress", "save_every", "steps")}
    state_path = args.checkpoint / EXPERTS_DIR / STATE_FILE
    step, history = 0, []
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["settings"] == settings:
            for layer, router in routers.items():
                router.load_state_dict(state["routers"][layer])
            optimizer.load_state_dict(state["optimizer"])
            step, history = state["step"], state["history"]
            print(f"d2moe train-router: resuming at step {step} from {state_path}")
        else:
            print(f"d2moe train-router: {state_path} was made with other settings; starting over")

    def save():
        torch.save({"settings": settings, "step": step, "history": history, "optimizer": optimizer.state_dict(),
                    "routers": {layer: r.state_dict() for layer, r in routers.items()}}, state_path)

    started = time.monotonic()
    set_mode(model, "train")
    with stop_on_signal() as stop, tqdm(total=args.steps, initial=step, disable=args.no_progress,
                                        desc="router", unit="step") as bar:
        while step < args.steps and not stop.is_set():
            temperature = 1.0 * (0.1 ** (step / max(1, args.steps - 1)))
            for m in simulated_experts(model).values():
                m.temperature = temperature
            batch = sampler.batch(step)[:, :-1]
            with torch.no_grad():
                target = teacher_logits(batch)
            logits = model(input_ids=batch).logits
            probs = [m.probs for m in simulated_experts(model).values()]
            parts = router_loss(logits, target, probs, widths, args.alpha)
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            optimizer.step()
            step += 1
            history.append({"step": step, "kl": parts.task, "expected_bits": parts.expected_bits})
            bar.set_postfix(kl=f"{parts.task:.4f}", bits=f"{parts.expected_bits:.2f}")
            bar.update()
            if step % args.save_every == 0:
                save()
    if step < args.steps:
        save()
        print(f"d2moe train-router: stopped at step {step}; run the same command to resume", file=sys.stderr)
        raise KeyboardInterrupt
    calibration = calibrate(model, calib_windows, widths)
    training = {
        **settings, "steps": step, "teacher_bits": teacher_bits, "seconds": round(time.monotonic() - started, 1),
        "final_kl": float(np.mean([h["kl"] for h in history[-20:]])),
    }
    router_set = RouterSet(widths, args.kind, routers, capacities, tuple(calibration), training)
    path = router_set.save(args.checkpoint)
    state_path.unlink(missing_ok=True)
    print(f"d2moe train-router: wrote {path} ({json.dumps({k: training[k] for k in ('final_kl', 'seconds')})})")
    return path


def run(args) -> int:
    try:
        train_router(args)
    except KeyboardInterrupt:
        return 130
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"d2moe train-router: error: {e}", file=sys.stderr)
        return 1
    return 0
