"""Every change this plugin makes to vLLM's own classes, in one place.

vLLM has no hooks for what these do, so each wraps one method of the pinned
release (:data:`vllm_d2moe.SUPPORTED_VLLM_VERSIONS`); what the wrapper does
lives in the module that owns the logic (``request_targets``,
``request_faults``, ``expert_op``), only the wrapping is here. :func:`apply`
runs from :func:`vllm_d2moe.register` in every vLLM process, checks the
running vLLM first, and wraps each method once (a wrapped method carries
``_d2moe_patch``, so a second call, or a second registration, changes nothing).

On a vLLM release other than the pinned ones the wrapped methods may have other
signatures or meanings, and a wrong wrapper fails in the middle of serving (or,
worse, silently finishes the wrong requests), so :func:`apply` refuses to start
there unless ``D2MOE_ALLOW_UNTESTED_VLLM=1`` is set; then it warns.
"""

import functools
import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

ALLOW_UNTESTED_ENV = "D2MOE_ALLOW_UNTESTED_VLLM"
_MARK = "_d2moe_patch"


class UnsupportedVLLMVersion(RuntimeError):
    """The running vLLM is not a release this plugin's patches were written for."""


def _public(version: str) -> str:
    """``0.32.0`` of ``0.32.0+cpu`` (a local build tag changes no code we wrap)."""
    return version.split("+", 1)[0]


def check_vllm_version(version: str | None = None) -> str:
    """The running vLLM version, if supported; raises :class:`UnsupportedVLLMVersion` otherwise
    (a warning instead when ``D2MOE_ALLOW_UNTESTED_VLLM=1``)."""
    from vllm_d2moe import SUPPORTED_VLLM_VERSIONS

    if version is None:
        import vllm

        version = vllm.__version__
    if _public(version) in SUPPORTED_VLLM_VERSIONS:
        return version
    supported = ", ".join(SUPPORTED_VLLM_VERSIONS)
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        logger.warning(
            "d2moe: running on vLLM %s, which this plugin is not tested with (supported: %s); "
            "%s=1 is set, so its patches are applied anyway and may misbehave",
            version, supported, ALLOW_UNTESTED_ENV,
        )
        return version
    raise UnsupportedVLLMVersion(
        f"vllm-d2moe patches vLLM internals and supports vLLM {supported} only, but vLLM {version} "
        f"is installed. Install a supported release (pip install 'vllm=={SUPPORTED_VLLM_VERSIONS[-1]}'), "
        f"or set {ALLOW_UNTESTED_ENV}=1 to try this one anyway."
    )


@dataclass(frozen=True)
class Patch:
    """``owner`` (``module:Class``)'s ``method`` replaced by ``wrap(original)``, for reason ``why``."""

    owner: str
    method: str
    why: str
    wrap: Callable[[Callable], Callable]

    @property
    def name(self) -> str:
        return f"{self.owner}.{self.method}"

    def resolve(self) -> type:
        module, _, cls = self.owner.partition(":")
        return getattr(importlib.import_module(module), cls)


# --- the wrappers: thin, each calls into the module that owns its logic ---


def _wrap_prepare_inputs(original):
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        from vllm_d2moe.vllm_glue import request_targets

        request_targets.record_batch(self, num_scheduled_tokens)
        return original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)

    return _prepare_inputs


def _wrap_execute_model(original):
    def execute_model(self, scheduler_output, intermediate_tensors=None, *args, **kwargs):
        from vllm_d2moe.vllm_glue import request_faults, width_control

        request_faults.start_step(intermediate_tensors)
        width_control.step_started()
        output = original(self, scheduler_output, intermediate_tensors, *args, **kwargs)
        return request_faults.send_downstream(output)

    return execute_model


def _wrap_sample_tokens(original):
    def sample_tokens(self, *args, **kwargs):
        from vllm_d2moe.vllm_glue import request_faults, width_control

        output = request_faults.attach_failures(original(self, *args, **kwargs))
        width_control.step_finished()
        return output

    return sample_tokens


def _wrap_update_from_output(original):
    def update_from_output(self, scheduler_output, model_runner_output):
        from vllm_d2moe.vllm_glue import request_faults

        failed = request_faults.finish_failed(self, model_runner_output)
        outputs = original(self, scheduler_output, model_runner_output)
        request_faults.attach_reasons(outputs, failed)
        return outputs

    return update_from_output


def _wrap_process_outputs(original):
    def process_outputs(self, engine_core_outputs, *args, **kwargs):
        from vllm_d2moe.vllm_glue import request_faults

        request_faults.note_failures(self, engine_core_outputs)
        return original(self, engine_core_outputs, *args, **kwargs)

    return process_outputs


def _wrap_raise_if_error(original):
    def _raise_if_error(self, finish_reason, request_id):
        from vllm_d2moe.vllm_glue import request_faults

        request_faults.raise_with_reason(finish_reason, request_id)
        return original(self, finish_reason, request_id)

    return _raise_if_error


def _wrap_select_forward(original):
    def _select_forward(self):
        # Not imported for other models: a d2moe layer's method has imported it already.
        moe_method = sys.modules.get("vllm_d2moe.vllm_glue.moe_method")
        if moe_method is not None and isinstance(self._quant_method, moe_method.D2MoEMethod):
            from vllm_d2moe.vllm_glue.expert_op import runner_forward_entry

            return runner_forward_entry(self)
        return original(self)

    return _select_forward


_warned_v2 = []


def _wrap_use_v2_model_runner(original):
    """(The property's getter.) d2moe models run on V1's ``GPUModelRunner``, the class the step
    patches above wrap; vLLM 0.32 picks Model Runner V2 on GPUs with Triton by default."""

    def use_v2_model_runner(self):
        from vllm_d2moe.mwq.checkpoint import QUANT_METHOD

        if self.model_config is None or self.model_config.quantization != QUANT_METHOD:
            return original(self)
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true") and not _warned_v2:
            _warned_v2.append(True)
            logger.warning("d2moe: VLLM_USE_V2_MODEL_RUNNER=1 is ignored: d2moe models run on vLLM's V1 "
                           "model runner (per-request targets and expert faults hook into it)")
        return False

    return use_v2_model_runner


def _wrap_vllm_config_post_init(original):
    def __post_init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.model_config is not None:
            from vllm_d2moe.vllm_glue.expert_op import keep_out_of_cuda_graphs

            keep_out_of_cuda_graphs(self.compilation_config, self.model_config.quantization)
        quant_config = sys.modules.get("vllm_d2moe.vllm_glue.quant_config")
        if quant_config is not None and isinstance(self.quant_config, quant_config.D2MoEConfig):
            self.quant_config.check_memory_budget(self.parallel_config)

    return __post_init__


def _wrap_worker_getattr(original):
    def __getattr__(self, attr):
        from vllm_d2moe.vllm_glue import metrics

        if attr == metrics.WORKER_STATS_METHOD:
            return metrics.process_stats
        return original(self, attr)

    return __getattr__


PATCHES = (
    Patch(
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner", "_prepare_inputs",
        "the MoE op sees a flat batch: keep the step's requests and token counts for per-request "
        "targets and fault mapping (request_targets)",
        _wrap_prepare_inputs,
    ),
    Patch(
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner", "execute_model",
        "each step starts with no pending expert fault and takes the previous pipeline stage's failed "
        "requests out of its intermediate tensors; a stage that is not the last sends its own on with "
        "its tensors (request_faults); its start times the step "
        "for the online width controller (width_control)",
        _wrap_execute_model,
    ),
    Patch(
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner", "sample_tokens",
        "carry the step's failed requests to the scheduler on its ModelRunnerOutput (request_faults); "
        "the step's end gives the online width controller its time (width_control)",
        _wrap_sample_tokens,
    ),
    Patch(
        "vllm.v1.core.sched.scheduler:Scheduler", "update_from_output",
        "finish requests whose experts could not be read with FINISHED_ERROR, reusing "
        "encoder_cache_mismatch_reqs, keep the rest of the batch going, and send why in the failed "
        "requests' stop_reason (request_faults)",
        _wrap_update_from_output,
    ),
    Patch(
        "vllm.model_executor.layers.fused_moe.runner.moe_runner:MoERunner", "_select_forward",
        "on GPUs the runner hides a MoE layer in the opaque vllm::moe_forward; for d2moe layers call "
        "its body, so torch.compile sees d2moe::moe_experts and splits CUDA graphs there (expert_op)",
        _wrap_select_forward,
    ),
    Patch(
        "vllm.config.vllm:VllmConfig", "use_v2_model_runner",
        "d2moe models run on the V1 GPUModelRunner the step patches wrap, not Model Runner V2 "
        "(vLLM's default on GPUs with Triton)",
        _wrap_use_v2_model_runner,
    ),
    Patch(
        "vllm.config.vllm:VllmConfig", "__post_init__",
        "keep the d2moe expert op out of CUDA graphs once vLLM has settled its compilation config "
        "(expert_op.keep_out_of_cuda_graphs); check memory_budget against one rank's share of an "
        "expert once the parallel layout is known (D2MoEConfig.check_memory_budget)",
        _wrap_vllm_config_post_init,
    ),
    Patch(
        "vllm.v1.worker.worker_base:WorkerWrapperBase", "__getattr__",
        "answer collective_rpc('d2moe_stats') in every worker with its offload and width statistics "
        "(metrics.engine_stats): a callable would need VLLM_ALLOW_INSECURE_SERIALIZATION",
        _wrap_worker_getattr,
    ),
)


# The OpenAI server's process imports this module before vLLM loads plugins; other processes
# never import it (it costs seconds), so the server patches apply only where it is loaded.
SERVER_MODULE = "vllm.entrypoints.generate.base.serving"
SERVER_PATCHES = (
    Patch(
        "vllm.v1.engine.output_processor:OutputProcessor", "process_outputs",
        "keep the message of a request failed by an unreadable expert, sent in its stop_reason, "
        "by the request id the server gave (request_faults)",
        _wrap_process_outputs,
    ),
    Patch(
        f"{SERVER_MODULE}:GenerateBaseServing", "_raise_if_error",
        "answer HTTP 500 with the failed expert's message rather than a bare 'Internal server "
        "error' (request_faults)",
        _wrap_raise_if_error,
    ),
)


def apply() -> list[str]:
    """Check the vLLM version, then wrap every method of :data:`PATCHES` (and of
    :data:`SERVER_PATCHES` in the OpenAI server's process) not wrapped yet; returns the names
    of those wrapped by this call."""
    check_vllm_version()
    applied = []
    for patch in PATCHES + (SERVER_PATCHES if SERVER_MODULE in sys.modules else ()):
        cls = patch.resolve()
        if is_applied(patch):
            continue
        original = inspect.getattr_static(cls, patch.method)
        is_property = isinstance(original, property)
        if is_property:  # the getter is wrapped
            original = original.fget
        wrapper = functools.wraps(original)(patch.wrap(original))
        setattr(wrapper, _MARK, patch.name)
        setattr(cls, patch.method, property(wrapper) if is_property else wrapper)
        applied.append(patch.name)
    if applied:
        logger.debug("d2moe: patched %s", ", ".join(applied))
    return applied


def wrapped(patch: Patch):
    """The function now in place of ``patch``'s method (a property's getter)."""
    current = inspect.getattr_static(patch.resolve(), patch.method)
    return current.fget if isinstance(current, property) else getattr(patch.resolve(), patch.method)


def is_applied(patch: Patch) -> bool:
    return getattr(wrapped(patch), _MARK, None) == patch.name
