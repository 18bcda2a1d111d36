"""An expert that cannot be read fails the requests that needed it, and the batch goes on.

The offload manager's fault sink is :func:`record` (``vllm_d2moe/offload/faults.py``:
the layer computes everything else and leaves the failed pairs at zero). Three
wrappers of the pinned vLLM release carry the faults of a step to the client:

- ``GPUModelRunner.execute_model`` starts each step with no pending fault (a
  fault of a warm-up or profiling pass, which maps to no request, is logged);
- ``GPUModelRunner.sample_tokens`` maps the step's faulted tokens to their
  requests (the batch layout kept by ``request_targets``), logs each with the
  store's error (file, layer, expert) and attaches ``{request id: message}`` to
  the step's ``ModelRunnerOutput``;
- ``Scheduler.update_from_output`` drops those requests' token of this step
  (sampled from incomplete expert outputs) and lets vLLM finish them with
  ``FINISHED_ERROR``: finish reason ``"error"`` offline, HTTP 500 on the OpenAI
  server. Every other request of the batch continues.

Under tensor parallelism only rank 0's output reaches the scheduler, so a rank
that is not rank 0 gets no sink and a failed read fails the step as before.
"""

import functools
import logging

from vllm_d2moe.offload.faults import ExpertFault
from vllm_d2moe.vllm_glue.request_targets import token_requests

logger = logging.getLogger(__name__)

# Attribute of the step's ModelRunnerOutput: {request id: why it failed}.
FAILED_REQUESTS_ATTR = "d2moe_failed_requests"

_pending: list[ExpertFault] = []


def record(fault: ExpertFault) -> None:
    """The offload manager's fault sink (called on the forward pass's thread)."""
    _pending.append(fault)


def failed_requests() -> dict[str, str]:
    """Take the step's faults as ``{request id: message}`` (the first fault of each request)."""
    failed: dict[str, str] = {}
    for fault in _pending:
        for req_id in token_requests(fault.tokens):
            failed.setdefault(req_id, str(fault))
    _pending.clear()
    for req_id, message in failed.items():
        logger.error("d2moe: request %s failed: %s", req_id, message)
    return failed


def _wrap(cls, name: str, make):
    original = getattr(cls, name)
    if getattr(original, "_d2moe_faults", False):
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper._d2moe_faults = True
    setattr(cls, name, wrapper)


def install() -> None:
    """Wrap the model runner and the scheduler (idempotent; vLLM's own modules imported here)."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def execute_model(original):
        def wrapper(self, *args, **kwargs):
            for fault in _pending:
                logger.error("d2moe: outside any request (warm-up or profiling pass): %s", fault)
            _pending.clear()
            return original(self, *args, **kwargs)

        return wrapper

    def sample_tokens(original):
        def wrapper(self, *args, **kwargs):
            output = original(self, *args, **kwargs)
            if _pending:
                # Under async scheduling (GPUs) the plain output sits inside the async one.
                plain = getattr(output, "_model_runner_output", output)
                setattr(plain, FAILED_REQUESTS_ATTR, failed_requests())
            return output

        return wrapper

    def update_from_output(original):
        def wrapper(self, scheduler_output, model_runner_output):
            failed = getattr(model_runner_output, FAILED_REQUESTS_ATTR, None)
            if failed:
                sampled = model_runner_output.sampled_token_ids
                for req_id in failed:
                    index = model_runner_output.req_id_to_index.get(req_id)
                    if index is not None and index < len(sampled):
                        sampled[index] = []
                # The set vLLM finishes with FINISHED_ERROR at the end of this update.
                self.encoder_cache_mismatch_reqs.update(failed)
            return original(self, scheduler_output, model_runner_output)

        return wrapper

    _wrap(GPUModelRunner, "execute_model", execute_model)
    _wrap(GPUModelRunner, "sample_tokens", sample_tokens)
    _wrap(Scheduler, "update_from_output", update_from_output)
