"""The opaque custom op ``torch.ops.d2moe.moe_experts`` through which vLLM's
(possibly torch.compiled) model calls the MWQ experts.

The expert compute is data dependent (tokens grouped per expert and width,
and later disk reads), which torch.compile cannot trace; behind a custom op
with a shape-only fake implementation it is a single node in the graph. Layers
are looked up by an integer id assigned when their weights are loaded.
"""

import itertools
import weakref

import torch
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_d2moe.experts import LayerExperts
from vllm_d2moe.width_selection import select_widths

_LIBRARY = torch.library.Library("d2moe", "FRAGMENT")
# Weak: the layer's quantization method owns its experts, so they are freed with
# the model even when several engines run in one process.
_LAYERS: "weakref.WeakValueDictionary[int, LayerExperts]" = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count()


def register_layer(experts: LayerExperts) -> int:
    """Make a layer's experts callable from the op; returns its id."""
    layer_id = next(_NEXT_ID)
    _LAYERS[layer_id] = experts
    return layer_id


def _moe_experts(
    x: torch.Tensor, topk_weights: torch.Tensor, local_ids: torch.Tensor, layer_id: int
) -> torch.Tensor:
    experts = _LAYERS[layer_id]
    widths = select_widths(local_ids, experts.bits)
    return experts.forward(x, topk_weights, local_ids, widths)


def _moe_experts_fake(
    x: torch.Tensor, topk_weights: torch.Tensor, local_ids: torch.Tensor, layer_id: int
) -> torch.Tensor:
    return torch.empty_like(x)


direct_register_custom_op(
    op_name="moe_experts",
    op_func=_moe_experts,
    mutates_args=[],
    fake_impl=_moe_experts_fake,
    target_lib=_LIBRARY,
)
