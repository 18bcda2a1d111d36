"""Per-request target bit-widths: from a request's ``extra_args`` to its tokens in the batch.

(The same wrapper keeps the step's batch layout, so that :func:`token_requests`
tells which requests a set of token indices belongs to.)

A request asks for its own average width with
``SamplingParams(extra_args={"d2moe_target_bits": 2.5})`` (OpenAI server:
``"vllm_xargs": {"d2moe_target_bits": 2.5}`` in the request body). The MoE op
sees only a flat batch of tokens, so the model runner's input preparation is
wrapped: it knows each scheduled request and how many of its tokens this step
runs, in batch order, and leaves one target per token (NaN: none) here for the
op of every layer of that forward pass.

This wraps ``GPUModelRunner._prepare_inputs`` (the CPU runner inherits it) of
the pinned vLLM release; :func:`install` runs from the plugin's registration in
every vLLM process. A target outside the router's calibrated range is clamped
to it, with a warning, rather than failing the batch it shares with others.
"""

import functools
import logging
import math

import numpy as np
import torch

from vllm_d2moe.width_selection import TARGET_EXTRA_ARG

logger = logging.getLogger(__name__)

# The current step: each token's target, and the batch layout (request ids, tokens of each).
_state = {"targets": None, "layout": ([], np.zeros(0, dtype=np.int64))}
# Set by the quantization config once it knows the router's calibrated range.
_limits = {"range": None}


def set_calibrated_range(low: float, high: float) -> None:
    _limits["range"] = (low, high)


_warned: set[str] = set()  # requests already warned about (each step sees them again)


def _warn_once(request_id: str, message: str, *args) -> None:
    if request_id not in _warned:
        if len(_warned) > 10_000:
            _warned.clear()
        _warned.add(request_id)
        logger.warning(message, request_id, *args)


def _request_target(request) -> float:
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    value = extra.get(TARGET_EXTRA_ARG)
    if value is None:
        return math.nan
    try:
        target = float(value)
    except (TypeError, ValueError):
        _warn_once(request.req_id, "d2moe: request %s: %s=%r is not a number; ignored", TARGET_EXTRA_ARG, value)
        return math.nan
    if _limits["range"] is not None:
        low, high = _limits["range"]
        if not low <= target <= high:
            _warn_once(request.req_id, "d2moe: request %s: %s=%s clamped to the router's range [%.3f, %.3f]",
                       TARGET_EXTRA_ARG, target, low, high)
            target = min(max(target, low), high)
    return target


def record_batch(runner, num_scheduled_tokens: np.ndarray) -> None:
    """Store one target per scheduled token, in the order the runner lays the batch out."""
    req_ids = runner.input_batch.req_ids[: len(num_scheduled_tokens)]
    _state["layout"] = (req_ids, num_scheduled_tokens)
    per_request = np.array([_request_target(runner.requests[r]) for r in req_ids], dtype=np.float32)
    if np.isnan(per_request).all():
        _state["targets"] = None
    else:
        _state["targets"] = torch.from_numpy(np.repeat(per_request, num_scheduled_tokens))


def token_targets(num_tokens: int) -> torch.Tensor | None:
    """Targets of the current forward pass's ``num_tokens`` tokens (padding gets none)."""
    targets = _state["targets"]
    if targets is None:
        return None
    if targets.numel() >= num_tokens:
        return targets[:num_tokens]
    return torch.cat([targets, torch.full((num_tokens - targets.numel(),), math.nan)])


def token_requests(tokens: torch.Tensor) -> list[str]:
    """The distinct requests (in batch order) of the current forward pass's ``tokens``
    (indices); padding tokens belong to none."""
    req_ids, counts = _state["layout"]
    ends, tokens = np.cumsum(counts), tokens.numpy()  # only on a fault: nothing per step
    indices = np.unique(np.searchsorted(ends, tokens[tokens < (ends[-1] if len(ends) else 0)], side="right"))
    return [req_ids[i] for i in indices]


def install() -> None:
    """Wrap the model runner's input preparation (idempotent)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._prepare_inputs
    if getattr(original, "_d2moe_targets", False):
        return

    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        record_batch(self, num_scheduled_tokens)
        return original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)

    _prepare_inputs._d2moe_targets = True
    GPUModelRunner._prepare_inputs = _prepare_inputs
