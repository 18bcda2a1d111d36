"""``d2moe train-router CKPT``: train the bit-width routers of a d2moe checkpoint offline.

The model is the checkpoint itself in transformers (:mod:`vllm_d2moe.router.simulate`):
every expert dequantized at the candidate widths, everything else frozen; only
the routers learn. Two objectives (:mod:`vllm_d2moe.router.loss`):

``error`` (default): ``--pool-windows`` calibration windows run once at the
widest stored width, measuring for every (token, expert) pair the squared error
``w^2 ||y_k - y_widest||^2`` it would add at each candidate width k, turned
into KL units by its layer's sensitivity (the KL to the teacher with only that
layer at the narrowest width, per unit of that error). Each step then fits the
routers, on pairs drawn from that pool, so that their shifted choice
``argmax_k logit_k - s b_k`` is the error-aware allocation ``argmin_k cost_k +
s b_k`` at shifts ``s`` where pairs change width: the least predicted error for
each average width.

``kl`` (the paper's): runs the teacher (``--teacher`` unquantized model, or the
checkpoint at its widest stored width), then the routed model with a
straight-through Gumbel choice of widths under the per-width capacities, and
takes an Adam step on KL(teacher || model) + alpha * expected bits. The Gumbel
temperature anneals from 1 to 0.1, so late steps train on nearly the choices
serving makes.

Afterwards the target-bits calibration (average width against score shift,
on held-back calibration windows) is measured and everything is written to
``CKPT/d2moe/router.safetensors``; the capacities are recorded as the default
average width. The expert blobs are not touched.
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
from vllm_d2moe.router.loss import allocation_loss, router_loss, task_kl
from vllm_d2moe.router.model import KINDS, RouterSet, WidthRouter
from vllm_d2moe.router.policy import ServingWidths
from vllm_d2moe.router.simulate import load_simulated_model, set_mode, simulated_experts
from vllm_d2moe.stop_signal import stop_on_signal
from vllm_d2moe.token_windows import WindowSampler

STATE_FILE = "router-training.pt"
OBJECTIVES = ("error", "kl")
MEASURE_WINDOWS = 8  # windows per forward while the error objective measures its pool
# Wide enough that the ends reach (nearly) all-narrowest and all-widest on trained routers: steps of
# 0.25 up to 32, and geometric steps from 0.001 to 1000 (error-fitted scores span decades: a
# low-weight pair's costs are a small fraction of a heavy one's).
_MAGNITUDES = np.geomspace(1e-3, 1e3, 121)
CALIBRATION_SHIFTS = np.unique(np.concatenate([np.linspace(-32.0, 32.0, 257), -_MAGNITUDES, _MAGNITUDES]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="d2moe checkpoint directory (from `d2moe convert`)")
    parser.add_argument("--calib", default="corpus:train",
                        help="calibration text: a UTF-8 file, or corpus:SPLIT for the reference corpus "
                             "(default corpus:train)")
    parser.add_argument("--calib-chars", type=int, default=3_000_000, help="characters of calibration text used")
    parser.add_argument("--widths", type=int, nargs="+", default=[2, 3, 4], help="candidate widths (default 2 3 4)")
    parser.add_argument("--capacities", type=float, nargs="+", default=[0.3, 0.4, 0.3],
                        help="per-width fractions, one per width (default 0.3 0.4 0.3): their average width is "
                             "the router's default; objective kl also trains under them as per-batch caps")
    parser.add_argument("--objective", choices=OBJECTIVES, default="error",
                        help="error: fit the routers to the error-aware allocation from each pair's measured "
                             "output error per width; kl: the paper's KL-to-teacher loss under the capacities "
                             "(default error)")
    parser.add_argument("--alpha", type=float, default=1e-3,
                        help="objective kl: weight of the expected-bits term (default 1e-3)")
    parser.add_argument("--kind", choices=KINDS, default="expert",
                        help="one router per expert (the paper's) or one per layer (default expert)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="unquantized model for the KL target and the layer sensitivities "
                             "(default: the checkpoint at its widest width)")
    parser.add_argument("--pool-windows", type=int, default=64,
                        help="objective error: calibration windows whose pairs are measured once and fitted "
                             "(default 64; holds their MoE inputs in float32)")
    parser.add_argument("--steps", type=int, default=300,
                        help="optimizer steps (objective error: each on batch-size x seq-len tokens' pairs "
                             "drawn from the pool)")
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


class PairCosts:
    """While entered, records every layer call's router inputs and each pair's cost per candidate width.

    The model must run at its widest loaded width (the teacher's trajectory). A pair's
    cost at width k is ``w^2 * ||y_k - y_widest||^2``: the squared error its weighted
    expert output adds to the residual stream. :meth:`collected` gives a layer's
    ``(hidden [T, H], weights [T, top_k], ids [T, top_k], costs [T, top_k, K])`` over all calls.
    """

    def __init__(self, model, widths: tuple[int, ...]):
        self.layers = simulated_experts(model)
        self.widths = widths
        self.records: dict[int, list[tuple[torch.Tensor, ...]]] = {layer: [] for layer in self.layers}

    def __enter__(self) -> "PairCosts":
        self._handles = [m.register_forward_hook(self._record) for m in self.layers.values()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def collected(self, layer: int) -> tuple[torch.Tensor, ...]:
        return tuple(torch.cat(parts) for parts in zip(*self.records[layer]))

    @torch.no_grad()
    def _record(self, module, inputs, output) -> None:
        hidden, ids, weights = inputs
        costs = torch.empty(*ids.shape, len(self.widths))
        for expert in ids.unique().tolist():
            token, slot = (ids == expert).nonzero(as_tuple=True)
            y = module.expert_outputs(hidden[token], (*self.widths, max(module.widths)), expert)
            costs[token, slot] = (y[:, :-1] - y[:, -1:]).square().sum(-1)
        costs *= weights.float().square().unsqueeze(-1)
        self.records[module.layer].append((hidden.detach().float(), weights.detach().float(), ids.detach(), costs))


def _widest(model) -> str:
    return f"fixed:{max(max(m.widths) for m in simulated_experts(model).values())}"


@torch.no_grad()
def measure_pairs(model, windows: torch.Tensor, widths: tuple[int, ...], batch_size: int) -> dict:
    """Every layer's pairs on ``windows`` (run at the widest loaded width): ``{layer: PairCosts.collected}``."""
    set_mode(model, _widest(model))
    with PairCosts(model, widths) as recorder:
        for batch in windows.split(batch_size):
            model(input_ids=batch)
    return {layer: recorder.collected(layer) for layer in recorder.layers}


@torch.no_grad()
def cost_scales(model, windows: torch.Tensor, teacher_logits, widths: tuple[int, ...]) -> dict[int, float]:
    """Per layer, the factor from a pair's squared error to its cost in normalized KL units.

    A layer's sensitivity is the KL to the teacher added when only that layer runs at
    the narrowest width, per unit of its pairs' summed squared error there (layers
    differ: what a late layer breaks is not repaired downstream). Costs are then
    divided by the mean narrowest-to-widest cost difference, so a typical pair's
    logits span about 1 and the calibrated shifts stay in a few units.
    """
    layers = simulated_experts(model)
    target = teacher_logits(windows)
    reference = _widest(model)
    set_mode(model, reference)
    with PairCosts(model, widths) as recorder:
        baseline = task_kl(model(input_ids=windows).logits, target)
    sensitivity, spans = {}, []
    for layer, module in layers.items():
        module.mode = f"fixed:{widths[0]}"
        added = float(task_kl(model(input_ids=windows).logits, target) - baseline)
        module.mode = reference
        costs = recorder.collected(layer)[3]
        sensitivity[layer] = max(added, 0.0) / max(float(costs[..., 0].sum()) / windows.numel(), 1e-30)
        spans.append(sensitivity[layer] * (costs[..., 0] - costs[..., -1]).flatten())
    unit = float(torch.cat(spans).mean())
    if not unit > 0:
        raise ValueError("the narrowest width adds no measurable KL on the calibration windows: "
                         "nothing for a width router to allocate")
    return {layer: s / unit for layer, s in sensitivity.items()}


def shifts_at_breakpoints(costs: torch.Tensor, widths: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """One shift per pair of ``costs [pairs, K]``, drawn from the shifts where some pair changes width.

    Pair i is indifferent between widths k and k+1 at ``(c_k - c_{k+1}) / (b_{k+1} - b_k)``;
    training at those shifts spreads the fit over every average width serving can ask for.
    """
    steps = torch.tensor(widths, dtype=torch.float32).diff()
    breakpoints = ((costs[:, :-1] - costs[:, 1:]) / steps).flatten()
    return breakpoints[torch.randint(breakpoints.numel(), (costs.shape[0],), generator=generator)]


def _error_step(routers, pool: dict, widths, scales, tokens: int, generator) -> dict:
    """The allocation loss on ``tokens`` random tokens' pairs of every layer's pool (not yet backpropagated)."""
    logits, costs = [], []
    for layer, (hidden, weights, ids, raw) in pool.items():
        rows = torch.randint(hidden.shape[0], (tokens,), generator=generator)
        logits.append(routers[layer](hidden[rows], weights[rows], ids[rows]).reshape(-1, len(widths)))
        costs.append(raw[rows].reshape(-1, len(widths)) * scales[layer])
    logits, costs = torch.cat(logits), torch.cat(costs)
    shifts = shifts_at_breakpoints(costs, widths, generator)
    return {"loss": allocation_loss(logits, costs, widths, shifts)}


def _kl_step(model, batch, widths, teacher_logits, alpha, temperature) -> dict:
    """The paper's loss on ``batch`` with a straight-through Gumbel choice at ``temperature``."""
    with torch.no_grad():
        target = teacher_logits(batch)
    set_mode(model, "train")
    for m in simulated_experts(model).values():
        m.temperature = temperature
    logits = model(input_ids=batch).logits
    parts = router_loss(logits, target, [m.probs for m in simulated_experts(model).values()], widths, alpha)
    return {"loss": parts.total, "kl": parts.task, "expected_bits": parts.expected_bits}


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
    # The widest stored width: the default teacher, and what objective error measures errors against.
    extra = [] if args.teacher and args.objective == "kl" else [checkpoint.spec.max_bits]
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
    scales = pool = None
    # Inside the stop request: a Ctrl-C while the pool is measured stops (and saves) before step one.
    with stop_on_signal() as stop, tqdm(total=args.steps, initial=step, disable=args.no_progress,
                                        desc="router", unit="step") as bar:
        if args.objective == "error":  # deterministic: a resumed run measures the same pool
            scales = cost_scales(model, calib_windows[:8], teacher_logits, widths)
            pool_windows = torch.cat([sampler.batch(i)[:, :-1] for i in range(math.ceil(args.pool_windows
                                                                                         / args.batch_size))])
            pool = measure_pairs(model, pool_windows[: args.pool_windows], widths, MEASURE_WINDOWS)
        while step < args.steps and not stop.is_set():
            if pool is None:
                temperature = 1.0 * (0.1 ** (step / max(1, args.steps - 1)))
                batch = sampler.batch(step)[:, :-1]
                parts = _kl_step(model, batch, widths, teacher_logits, args.alpha, temperature)
            else:
                generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
                parts = _error_step(routers, pool, widths, scales, args.batch_size * args.seq_len, generator)
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            optimizer.step()
            step += 1
            history.append({"step": step, **{k: float(v) for k, v in parts.items()}})
            bar.set_postfix({k: f"{float(v):.4f}" for k, v in parts.items()})
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
        "final_loss": float(np.mean([h["loss"] for h in history[-20:]])),
        **({"cost_scales": {str(layer): v for layer, v in scales.items()}} if scales else {}),
    }
    router_set = RouterSet(widths, args.kind, routers, capacities, tuple(calibration), training)
    path = router_set.save(args.checkpoint)
    state_path.unlink(missing_ok=True)
    print(f"d2moe train-router: wrote {path} ({json.dumps({k: training[k] for k in ('final_loss', 'seconds')})})")
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
