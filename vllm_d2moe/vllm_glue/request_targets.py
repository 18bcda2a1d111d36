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

:func:`record_batch` runs before ``GPUModelRunner._prepare_inputs`` (the CPU
runner inherits it) of the pinned vLLM release, wrapped in
``vllm_glue/patches.py``. A target outside the router's calibrated range is clamped
to it, with a warning, rather than failing the batch it shares with others.
"""

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


def token_targets(num_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Targets of the current forward pass's ``num_tokens`` tokens (padding gets none), on ``device``
    (the batch's: the width decision compares them with device tensors)."""
    targets = _state["targets"]
    if targets is None:
        return None
    if targets.numel() >= num_tokens:
        targets = targets[:num_tokens]
    else:
        targets = torch.cat([targets, torch.full((num_tokens - targets.numel(),), math.nan)])
    return targets.to(device)


def token_requests(tokens: torch.Tensor) -> list[str]:
    """The distinct requests (in batch order) of the current forward pass's ``tokens``
    (indices); padding tokens belong to none."""
    req_ids, counts = _state["layout"]
    # Only on a fault: nothing per step. The fault's tokens may live on the GPU.
    ends, tokens = np.cumsum(counts), tokens.cpu().numpy()
    indices = np.unique(np.searchsorted(ends, tokens[tokens < (ends[-1] if len(ends) else 0)], side="right"))
    return [req_ids[i] for i in indices]
