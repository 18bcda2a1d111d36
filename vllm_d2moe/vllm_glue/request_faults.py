"""An expert that cannot be read fails the requests that needed it, and the batch goes on.

The offload manager's fault sink is :func:`record` (``vllm_d2moe/offload/faults.py``:
the layer computes everything else and leaves the failed pairs at zero). Three
steps, each called from a wrapper of the pinned vLLM release
(``vllm_glue/patches.py``), carry the faults of a step to the client:

- :func:`start_step`, before ``GPUModelRunner.execute_model``: each step
  starts with no pending fault (a fault of a warm-up or profiling pass, which
  maps to no request, is logged);
- :func:`attach_failures`, after ``GPUModelRunner.sample_tokens``: maps the
  step's faulted tokens to their requests (the batch layout kept by
  ``request_targets``), logs each with the store's error (file, layer, expert)
  and attaches ``{request id: message}`` to the step's ``ModelRunnerOutput``;
- :func:`finish_failed`, before ``Scheduler.update_from_output``: drops those
  requests' token of this step (sampled from incomplete expert outputs) and
  lets vLLM finish them with ``FINISHED_ERROR``: finish reason ``"error"``
  offline, HTTP 500 on the OpenAI server. Every other request of the batch continues.

The message travels with the request: :func:`attach_reasons`, after
``Scheduler.update_from_output``, puts it in the ``stop_reason`` of the
request's final ``EngineCoreOutput`` (offline, ``CompletionOutput.stop_reason``
then says which expert failed). In the OpenAI server's process,
:func:`note_failures`, before ``OutputProcessor.process_outputs``, keeps it by
the request id the server gave, and :func:`raise_with_reason`, before the
server's ``_raise_if_error``, answers HTTP 500 with it as the error body's
message (the file by its name alone) instead of vLLM's bare "Internal server error".

Under tensor parallelism only rank 0's output reaches the scheduler, so a rank
that is not rank 0 gets no sink and a failed read fails the step as before.
Under pipeline parallelism only the last stage's output reaches it, and the
other stages' faults would otherwise be cleared by their next step while the
requests go on with those experts' contribution at zero: a stage that is not
the last sends its step's failed requests (its own and those sent to it) to the
next stage with its :class:`IntermediateTensors` (:func:`send_downstream`,
after ``execute_model``), and the next stage takes them out of the tensors it
receives before its model sees them (:func:`start_step`), so the last stage
fails them as its own.
"""

import json
import logging
import re

import torch
from vllm.exceptions import GenerationError
from vllm.sequence import IntermediateTensors
from vllm.v1.engine import FinishReason

from vllm_d2moe.offload.faults import ExpertFault
from vllm_d2moe.vllm_glue.request_targets import token_requests

logger = logging.getLogger(__name__)

# Attribute of the step's ModelRunnerOutput: {request id: why it failed}.
FAILED_REQUESTS_ATTR = "d2moe_failed_requests"

# Key of a pipeline stage's IntermediateTensors that carries the step's failed requests to the
# next stage: JSON ``{request id: message}`` as a uint8 tensor (vLLM's CPU stages send tensors only).
PIPELINE_FAULTS_KEY = "d2moe_failed_requests"

_pending: list[ExpertFault] = []
# The step's requests that earlier pipeline stages failed, with their messages (logged there).
_upstream: dict[str, str] = {}


def record(fault: ExpertFault) -> None:
    """The offload manager's fault sink (called on the forward pass's thread)."""
    _pending.append(fault)


def failed_requests() -> dict[str, str]:
    """Take the step's faults as ``{request id: message}`` (the first fault of each request, an
    earlier pipeline stage's first)."""
    found: dict[str, str] = {}
    for fault in _pending:
        for req_id in token_requests(fault.tokens):
            found.setdefault(req_id, str(fault))
    _pending.clear()
    failed = dict(_upstream)
    _upstream.clear()
    for req_id, message in found.items():
        if req_id not in failed:
            failed[req_id] = message
            logger.error("d2moe: request %s failed: %s", req_id, message)
    return failed


def start_step(intermediate_tensors: IntermediateTensors | None = None) -> None:
    """A new step (``intermediate_tensors``: what the previous pipeline stage sent, if any): a fault
    still pending came from a pass outside any request (warm-up, profiling); the previous stage's
    failed requests are taken out of its tensors, which the model must not see."""
    for fault in _pending:
        logger.error("d2moe: outside any request (warm-up or profiling pass): %s", fault)
    _pending.clear()
    _upstream.clear()
    if intermediate_tensors is not None:
        encoded = intermediate_tensors.tensors.pop(PIPELINE_FAULTS_KEY, None)
        if encoded is not None:
            _upstream.update(json.loads(encoded.cpu().numpy().tobytes()))


def send_downstream(output):
    """``output`` of ``execute_model``; on a pipeline stage that is not the last (its output is the
    next stage's :class:`IntermediateTensors`) the step's failed requests go with it."""
    if isinstance(output, IntermediateTensors) and (_pending or _upstream):
        encoded = json.dumps(failed_requests()).encode()
        output.tensors[PIPELINE_FAULTS_KEY] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
    return output


def attach_failures(output):
    """``output`` of ``sample_tokens``, with the step's ``{request id: message}`` attached when any failed."""
    if _pending or _upstream:
        # Under async scheduling (GPUs) the plain output sits inside the async one.
        plain = getattr(output, "_model_runner_output", output)
        setattr(plain, FAILED_REQUESTS_ATTR, failed_requests())
    return output


def finish_failed(scheduler, model_runner_output) -> dict[str, str]:
    """Drop the failed requests' token of this step and have ``scheduler`` finish them with an error;
    returns them as ``{request id: message}``."""
    failed = getattr(model_runner_output, FAILED_REQUESTS_ATTR, None)
    if not failed:
        return {}
    sampled = model_runner_output.sampled_token_ids
    for req_id in failed:
        index = model_runner_output.req_id_to_index.get(req_id)
        if index is not None and index < len(sampled):
            sampled[index] = []
    # The set vLLM finishes with FINISHED_ERROR at the end of this update.
    scheduler.encoder_cache_mismatch_reqs.update(failed)
    return failed


def attach_reasons(engine_core_outputs: dict, failed: dict[str, str]) -> None:
    """Put each failed request's message in the ``stop_reason`` of its final output
    (``engine_core_outputs``: ``Scheduler.update_from_output``'s, by client)."""
    if not failed:
        return
    for outputs in engine_core_outputs.values():
        for output in outputs.outputs:
            if output.finish_reason == FinishReason.ERROR and output.request_id in failed:
                output.stop_reason = failed[output.request_id]


# In the OpenAI server's process: {request id the server gave: message}, until the server reads it.
_server_failures: dict[str, str] = {}
# Messages of requests whose client went away before reading them are dropped, oldest first, past this.
_MAX_SERVER_FAILURES = 10_000


def note_failures(output_processor, engine_core_outputs) -> None:
    """Keep the messages :func:`attach_reasons` sent, by the id the server gave each request
    (vLLM appends a random suffix to it for the engine)."""
    for output in engine_core_outputs:
        if output.finish_reason == FinishReason.ERROR and isinstance(output.stop_reason, str):
            state = output_processor.request_states.get(output.request_id)
            if state is None:  # aborted meanwhile: nobody reads it
                continue
            if len(_server_failures) >= _MAX_SERVER_FAILURES:
                del _server_failures[next(iter(_server_failures))]
            _server_failures[state.external_req_id] = output.stop_reason


def _take_server_failure(request_id: str) -> str | None:
    """The message of ``request_id`` or of one of its sub-requests (the completions endpoint
    sends prompt ``i`` as ``{id}-{i}``, chat as ``{id}_{i}``)."""
    key = next((k for k in _server_failures
                if k == request_id or k.startswith((request_id + "-", request_id + "_"))), None)
    return None if key is None else _server_failures.pop(key)


# An absolute path in a message: the server names the file alone (it would otherwise send
# "<path>": vLLM blanks paths in error bodies).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s:/]+/)*([^\s:/]+)")


def raise_with_reason(finish_reason: str | None, request_id: str) -> None:
    """Fail a request that finished with an error because of an expert with that expert's message
    (layer, expert, width, file name, what is wrong)."""
    if finish_reason == "error":
        message = _take_server_failure(request_id)
        if message is not None:
            raise GenerationError(_ABSOLUTE_PATH.sub(r"\1", message))
