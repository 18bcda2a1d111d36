"""Where each (token, expert) pair's bit-width is chosen.

The expert router picks experts; this module makes the second routing decision
of D²MoE's dual routing, the width, and counts what it chose.

Policies (the ``width_policy`` option, resolved once by
:func:`vllm_d2moe.router.policy.resolve_policy`):

* ``router``: the checkpoint's learned bit-width router (:mod:`vllm_d2moe.router`)
  scores the candidate widths of every pair and each pair takes its best score
  after one global shift (``scores - shift * b_k``): its width depends on its own
  token, expert and routing weight, its request's target and that shift, never
  on the other pairs of its batch. The shift is the calibrated one for the
  trained capacities' average width, fixed; with ``target_bits`` or ``slo`` the
  online controller (:mod:`vllm_d2moe.router.controller`) moves it between
  steps. Per-call capacities (at most ``ceil(c_k * N)`` of a call's N pairs at
  width k) only when the ``capacities`` option asks for them. The default when
  the checkpoint has a router.
* ``fixed:B``: every pair at width B (the ``bits`` option is shorthand). The
  default, at the widest stored width, when the checkpoint has no router.
* ``shuffled``: the router's choices, randomly re-dealt among the pairs of
  each call: the same width mix per layer and batch with no learned choice
  (the accuracy baseline for the router).

A request may carry its own target (``SamplingParams(extra_args={"d2moe_target_bits": 2.5})``,
see :mod:`vllm_d2moe.vllm_glue.request_targets`); its tokens then use that
target's calibrated shift, without capacities and untouched by the controller,
beside requests that use the server's policy.

On CPU, a batch without per-request targets takes the decision in one C++
call (:mod:`vllm_d2moe.kernels.cpu_width_select`, the same widths); the torch
ops here serve GPUs, per-request targets, and CPUs where that cannot be built.
"""

import functools
import logging
import math
import operator
import threading
import time

import torch

from vllm_d2moe.router.controller import WidthController
from vllm_d2moe.router.model import WidthRouter
from vllm_d2moe.router.policy import ServingWidths, choose_pair_widths

logger = logging.getLogger(__name__)

TARGET_EXTRA_ARG = "d2moe_target_bits"


class WidthStats:
    """Counts of chosen widths per layer since start (or the last reset); logged periodically.

    ``snapshot()`` gives ``{layer: {bits: pairs}}``; ``average_bits()`` the
    running average width over all pairs; ``capacity_excess()`` per layer the
    most any width exceeded its capacity ``c_k * N`` in one call (below one pair
    when capacities hold).
    """

    LOG_EVERY_SECONDS = 60.0

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[int, list[int]] = {}  # pairs per bit value 0..8
        self._excess: dict[int, float] = {}
        self._resets = 0
        self._last_log = time.monotonic()

    def record(self, layer: int, widths: torch.Tensor, capacities: dict[int, float] | None = None) -> None:
        """Count one call's ``widths``; ``capacities`` ({bits: c_k}) when they applied to all of it."""
        # Counted where the widths are: only the nine counts cross to the host (the op runs
        # outside CUDA graphs, vllm_glue/expert_op.py, so this one wait is allowed).
        counts = torch.bincount(widths.reshape(-1).long(), minlength=9)[:9].tolist()
        excess = None
        if capacities:
            excess = max(counts[b] - c * widths.numel() for b, c in capacities.items())
        self.record_counts(layer, counts, excess)

    def record_counts(self, layer: int, counts: list[int], excess: float | None = None) -> None:
        """:meth:`record` of a call already counted: ``counts`` pairs per bit value 0..8; ``excess``
        the most any width exceeded ``c_k * N`` in it, when capacities applied to all of it."""
        with self._lock:
            totals = self._counts.get(layer)
            self._counts[layer] = list(counts) if totals is None else list(map(operator.add, totals, counts))
            if excess is not None:
                self._excess[layer] = max(excess, self._excess.get(layer, -math.inf))
        if time.monotonic() - self._last_log > self.LOG_EVERY_SECONDS:
            self._last_log = time.monotonic()
            logger.info("d2moe: %s", self.summary())

    def snapshot(self) -> dict[int, dict[int, int]]:
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[int, dict[int, int]]:
        return {layer: {b: n for b, n in enumerate(counts) if n} for layer, counts in sorted(self._counts.items())}

    def counted_since_reset(self) -> tuple[int, dict[int, dict[int, int]]]:
        """``(resets so far, snapshot())`` read together, so that a reader keeping totals across
        resets (the Prometheus publisher) tells a reset from counts that did not grow."""
        with self._lock:
            return self._resets, self._snapshot()

    def capacity_excess(self) -> dict[int, float]:
        with self._lock:
            return dict(sorted(self._excess.items()))

    def average_bits(self) -> float | None:
        """Mean width over every counted pair (None before any)."""
        with self._lock:
            total = [sum(column) for column in zip([0] * 9, *self._counts.values())]
        pairs = sum(total)
        return None if pairs == 0 else sum(b * n for b, n in enumerate(total)) / pairs

    def summary(self) -> str:
        average = self.average_bits()
        per_layer = "; ".join(
            f"layer {layer}: " + " ".join(f"{b}b={n}" for b, n in hist.items())
            for layer, hist in self.snapshot().items()
        )
        return f"average width {average:.3f} bits ({per_layer})" if average is not None else "no pairs yet"

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._excess.clear()
            self._resets += 1


WIDTH_STATS = WidthStats()


@functools.cache
def _fused_kernel():
    """:mod:`vllm_d2moe.kernels.cpu_width_select`, built on first use; None (said once) where it cannot be."""
    from vllm_d2moe.kernels import cpu_width_select

    try:
        cpu_width_select.load()
    except Exception as e:  # noqa: BLE001 (a failed build must not stop serving: the torch ops decide then)
        logger.warning(
            "d2moe: the C++ width decision is unavailable (%s: %s); using the torch ops", type(e).__name__, e
        )
        return None
    return cpu_width_select


# Batches of up to this many tokens (decode steps) share their fixed widths tensor across calls.
_SHARED_FIXED_TOKENS = 256


class WidthSelector:
    """The width decision of one MoE layer (``layer``: its index in the model); ``controller``, shared
    by every layer of the engine, steers the shift when the policy is adaptive."""

    def __init__(self, layer: int, policy: ServingWidths, router: WidthRouter | None = None,
                 controller: WidthController | None = None):
        if policy.mode != "fixed" and router is None:
            raise ValueError(f"layer {layer}: width_policy {policy.mode!r} but the checkpoint has no router for it")
        self.layer = layer
        self.policy = policy
        self.router = router
        # Seeded per layer so that every tensor-parallel rank deals the same widths.
        self._generator = torch.Generator().manual_seed(layer) if policy.mode == "shuffled" else None
        # {bits: c_k} for the statistics' capacity check, when capacities apply.
        self._capacities = dict(zip(policy.widths, policy.capacities)) if policy.capacities else None
        self.controller = controller
        self._decision = None  # see _cpu_decision
        self._decision_shift = None
        self._warned_fixed = False
        self._fixed: dict[tuple, tuple[torch.Tensor, list[int]]] = {}  # see _fixed_widths

    def scores(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """``[tokens * top_k, K]`` log-probabilities of the candidate widths."""
        logits = self.router(x, topk_weights, topk_ids)
        return torch.log_softmax(logits, dim=-1).reshape(-1, len(self.policy.widths))

    def __call__(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        token_targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """int8 widths ``[tokens, top_k]``; ``token_targets [tokens]`` are per-request targets (NaN = none)."""
        if self.policy.mode == "fixed":
            if token_targets is not None and not self._warned_fixed:
                self._warned_fixed = True
                logger.warning("d2moe: requests ask for %s, but this server serves a fixed width "
                               "(width_policy %r); the targets are ignored", TARGET_EXTRA_ARG,
                               f"fixed:{self.policy.widths[0]}")
            return self._fixed_widths(topk_ids)
        shift = self.policy.shift if self.controller is None else self.controller.shift
        if token_targets is None and x.is_cpu and (decide := self._cpu_decision(shift)) is not None:
            widths, counts, excess = decide(x, topk_weights, topk_ids)
            if self._generator is not None:  # the same widths re-dealt: the counts stand
                widths = widths.view(-1)[self._permutation(widths.numel())].view_as(widths)
            WIDTH_STATS.record_counts(self.layer, counts, excess)
            if self.controller is not None:
                self.controller.record_pairs(counts)
            return widths
        top_k = topk_ids.shape[1]
        pair_targets = None if token_targets is None else token_targets.repeat_interleave(top_k)
        choice = choose_pair_widths(self.scores(x, topk_weights, topk_ids), self.policy, pair_targets, shift)
        if self._generator is not None:
            choice = choice[self._permutation(choice.numel()).to(choice.device)]
        table = torch.tensor(self.policy.widths, dtype=torch.int8, device=choice.device)
        widths = table[choice].view_as(topk_ids)
        WIDTH_STATS.record(self.layer, widths, self._capacities if pair_targets is None else None)
        if self.controller is not None:  # only the pairs it steers: requests with a target are their own
            steered = widths.view(-1) if pair_targets is None else widths.view(-1)[torch.isnan(pair_targets)]
            self.controller.record_pairs(torch.bincount(steered.long(), minlength=9)[:9].tolist())
        return widths

    def _fixed_widths(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Every pair at the fixed width, counted. A decode-sized shape's tensor and counts are made
        once and shared by later calls (callers only read widths): per call the decision is then a
        dict lookup (2.7 us here) instead of a fill and a bincount (17 us)."""
        key = (topk_ids.shape, topk_ids.device)
        made = self._fixed.get(key)
        if made is None:
            width = self.policy.widths[0]
            widths = torch.full_like(topk_ids, width, dtype=torch.int8)
            made = widths, [widths.numel() if b == width else 0 for b in range(9)]
            if topk_ids.shape[0] <= _SHARED_FIXED_TOKENS:
                self._fixed[key] = made
        WIDTH_STATS.record_counts(self.layer, made[1])
        return made[0]

    def _cpu_decision(self, shift: float):
        """This layer's C++ decision at ``shift``, made at the first CPU call and again when the
        controller has moved the shift (a few microseconds: it holds the router, not a copy);
        None where it cannot be built."""
        if self._decision_shift != shift and (kernel := _fused_kernel()) is not None:
            policy = self.policy
            self._decision = kernel.decision(self.router, policy.widths, policy.capacities, shift)
            self._decision_shift = shift
        return self._decision

    def _permutation(self, pairs: int) -> torch.Tensor:
        """The ``shuffled`` policy's re-deal of one call's widths (CPU, from the layer's generator)."""
        return torch.randperm(pairs, generator=self._generator)
