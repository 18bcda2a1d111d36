"""The opaque custom op ``torch.ops.d2moe.moe_experts`` through which vLLM's
(possibly torch.compiled) model calls the MWQ experts.

The expert compute is data dependent (tokens grouped per expert and width,
and later disk reads), which torch.compile cannot trace; behind a custom op
with a shape-only fake implementation it is a single node in the graph. Layers
are looked up by an integer id assigned when their weights are loaded: the
layer's quantization method, which holds its width selector and its experts.
"""

import itertools
import weakref

import torch
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_d2moe.vllm_glue.request_targets import token_targets

_LIBRARY = torch.library.Library("d2moe", "FRAGMENT")
# Weak: the layers' quantization methods belong to the model, so they are freed
# with it even when several engines run in one process.
_LAYERS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count()


def register_layer(method) -> int:
    """Make a layer callable from the op; returns its id.

    ``method`` has ``width_selector`` (a :class:`vllm_d2moe.width_selection.WidthSelector`)
    and ``experts`` (a :class:`vllm_d2moe.experts.LayerExperts` or anything with its ``forward``).
    """
    layer_id = next(_NEXT_ID)
    _LAYERS[layer_id] = method
    return layer_id


def _moe_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    local_ids: torch.Tensor,
    layer_id: int,
) -> torch.Tensor:
    """``topk_ids`` are global expert ids (the width decision sees every pair), ``local_ids``
    this rank's (-1 for experts held elsewhere)."""
    layer = _LAYERS[layer_id]
    widths = layer.width_selector(x, topk_weights, topk_ids, token_targets(x.shape[0]))
    return layer.experts.forward(x, topk_weights, local_ids, widths)


def moe_experts(x, topk_weights, topk_ids, local_ids, layer_id: int) -> torch.Tensor:
    """``torch.ops.d2moe.moe_experts`` as the MoE method calls it: through the dispatcher while
    torch.compile traces (the graph needs the opaque node), directly in eager mode, where the
    dispatcher's round trip back into Python cost about 15 us per layer call here (10 % of the
    reference model's whole layer call at one token)."""
    if torch.compiler.is_compiling():
        return torch.ops.d2moe.moe_experts(x, topk_weights, topk_ids, local_ids, layer_id)
    return _moe_experts(x, topk_weights, topk_ids, local_ids, layer_id)


def _moe_experts_fake(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    local_ids: torch.Tensor,
    layer_id: int,
) -> torch.Tensor:
    return torch.empty_like(x)


direct_register_custom_op(
    op_name="moe_experts",
    op_func=_moe_experts,
    mutates_args=[],
    fake_impl=_moe_experts_fake,
    target_lib=_LIBRARY,
)
