"""The opaque custom op ``torch.ops.d2moe.moe_experts`` through which vLLM's
(possibly torch.compiled) model calls the MWQ experts.

The expert compute is data dependent (tokens grouped per expert and width,
and later disk reads), which torch.compile cannot trace; behind a custom op
with a shape-only fake implementation it is a single node in the graph. Layers
are looked up by an integer id assigned when their weights are loaded: the
layer's quantization method, which holds its width selector and its experts.

CUDA graphs: the op is kept out of them, the way vLLM keeps its attention ops
out (:func:`keep_out_of_cuda_graphs`: the op is one of the compilation config's
``splitting_ops``, so piecewise graphs are captured around it and it runs
eagerly between them; full graphs, which would capture it, are turned off).
For the graph to be split at the op, torch.compile must see it: on GPUs vLLM's
MoE runner hides the whole MoE layer inside its own opaque ``vllm::moe_forward``
op (which returns a fresh tensor, so it cannot be a splitting op itself), so for
d2moe layers the runner calls that op's body directly, as it does on CPUs
(:func:`runner_forward_entry`).
The alternative, every per-call decision on the device, was not taken because
much of what the op decides cannot be a device computation: which experts the
offload manager must read from disk (and their faults, which fail requests),
per-width statistics, per-request targets that change every step. A captured
graph would replay one call's decisions forever; host synchronisation inside
the op (``.tolist()`` of the segment plan, the Triton block table, the pool's
slot table) is therefore allowed, and the rest of the model still runs in
graphs. Because a piecewise graph reads its inputs from the addresses seen at
capture, the op writes into an ``out`` tensor allocated in the traced code
before it (as vLLM's ``unified_attention_with_output``), never a fresh one.
"""

import itertools
import logging
import weakref

import torch
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_d2moe.vllm_glue.request_targets import token_targets

logger = logging.getLogger(__name__)

_LIBRARY = torch.library.Library("d2moe", "FRAGMENT")
# Weak: the layers' quantization methods belong to the model, so they are freed
# with it even when several engines run in one process.
_LAYERS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count()


def register_layer(method) -> int:
    """Make a layer callable from the op; returns its id.

    ``method`` has ``width_selector`` (a :class:`vllm_d2moe.width_selection.WidthSelector`),
    ``experts`` (a :class:`vllm_d2moe.experts.LayerExperts` or anything with its ``forward``) and
    ``predictor`` (None, or with ``forecasts(x, token_targets)`` for the offloaded experts' ``forward``).
    """
    layer_id = next(_NEXT_ID)
    _LAYERS[layer_id] = method
    return layer_id


# The op's qualified name, as vLLM's compilation config lists splitting ops.
OP_NAME = "d2moe::moe_experts"


def _compute(x, topk_weights, topk_ids, local_ids, layer_id: int) -> torch.Tensor:
    """``topk_ids`` are global expert ids (the width decision sees every pair), ``local_ids``
    this rank's (-1 for experts held elsewhere)."""
    layer = _LAYERS[layer_id]
    targets = token_targets(x.shape[0], x.device)
    widths = layer.width_selector(x, topk_weights, topk_ids, targets)
    if layer.predictor is None:
        return layer.experts.forward(x, topk_weights, local_ids, widths)
    # Cross-layer prefetch: forecasts from this layer's input, read while it computes.
    return layer.experts.forward(x, topk_weights, local_ids, widths, layer.forecasts(x, targets))


def _moe_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    local_ids: torch.Tensor,
    out: torch.Tensor,
    layer_id: int,
) -> None:
    """Writes the routed sum into ``out`` (same shape and dtype as ``x``)."""
    out.copy_(_compute(x, topk_weights, topk_ids, local_ids, layer_id))


def moe_experts(x, topk_weights, topk_ids, local_ids, layer_id: int) -> torch.Tensor:
    """``torch.ops.d2moe.moe_experts`` as the MoE method calls it: through the dispatcher while
    torch.compile traces (the graph needs the opaque node, and ``out`` allocated in the traced
    code, see above), directly in eager mode, where the dispatcher's round trip back into Python
    cost about 15 us per layer call here (10 % of the reference model's whole layer call at one
    token)."""
    if torch.compiler.is_compiling():
        out = torch.empty_like(x)
        torch.ops.d2moe.moe_experts(x, topk_weights, topk_ids, local_ids, out, layer_id)
        return out
    return _compute(x, topk_weights, topk_ids, local_ids, layer_id)


def _moe_experts_fake(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    local_ids: torch.Tensor,
    out: torch.Tensor,
    layer_id: int,
) -> None:
    return None


direct_register_custom_op(
    op_name="moe_experts",
    op_func=_moe_experts,
    mutates_args=["out"],
    fake_impl=_moe_experts_fake,
    target_lib=_LIBRARY,
)


def runner_forward_entry(runner):
    """The function vLLM's ``MoERunner`` of a d2moe layer calls for the layer's forward: the body of
    ``vllm::moe_forward`` (``_shared`` with shared experts) itself, traced by torch.compile down to
    ``d2moe::moe_experts``, instead of the opaque op that vLLM picks on GPUs (why: module docstring)."""
    from vllm.model_executor.layers.fused_moe.runner import moe_runner

    return moe_runner._moe_forward if runner._shared_experts is None else moe_runner._moe_forward_shared


def keep_out_of_cuda_graphs(compilation_config, quantization: str | None) -> None:
    """For a d2moe model, amend vLLM's settled ``compilation_config`` so that CUDA graphs never
    capture the expert op (why: module docstring). Run after ``VllmConfig.__post_init__``
    (``vllm_glue/patches.py``).

    Where vLLM splits the compiled graph at attention (GPUs, compilation mode VLLM_COMPILE) the op
    joins ``splitting_ops``, with CUDA graphs or without, so that both compile the same pieces.
    A mode with full graphs (vLLM's default ``FULL_AND_PIECEWISE``, which captures whole decode
    steps, splitting ops included) becomes ``PIECEWISE``; where the graph is not split at
    attention (no piecewise compilation, or breakable graphs, which break only at ops vLLM
    marks for it) graphs are turned off. CPUs (no graphs, no splitting) are left as they are.
    """
    from vllm import envs
    from vllm.config import CompilationMode, CUDAGraphMode

    from vllm_d2moe.mwq.checkpoint import QUANT_METHOD

    if quantization != QUANT_METHOD:
        return
    split = (
        compilation_config.mode == CompilationMode.VLLM_COMPILE
        and compilation_config.splitting_ops_contain_attention()
        and not envs.VLLM_USE_BREAKABLE_CUDAGRAPH
    )
    if split and OP_NAME not in compilation_config.splitting_ops:
        compilation_config.splitting_ops.append(OP_NAME)
    mode = compilation_config.cudagraph_mode
    if mode is None or mode == CUDAGraphMode.NONE:
        return
    if not split:
        logger.warning(
            "d2moe: CUDA graphs off (cudagraph_mode %s -> NONE): the d2moe expert op runs outside "
            "graphs, which needs piecewise compilation split at attention (compilation mode "
            "VLLM_COMPILE, default splitting_ops, no breakable CUDA graphs)", mode.name,
        )
        compilation_config.cudagraph_mode = CUDAGraphMode.NONE
        return
    if mode.has_full_cudagraphs():
        logger.info(
            "d2moe: cudagraph_mode %s -> PIECEWISE: the d2moe expert op runs outside CUDA graphs "
            "(it decides on the host per call), full graphs would capture it", mode.name,
        )
        compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE
