"""Pure-torch reference of the MWQ expert MLP; every faster backend is tested against it.

It reconstructs the expert's float32 weights from the packed planes on each
call (``vllm_d2moe.mwq.quantize.dequantize``) and accumulates in float32.
"""

import torch
import torch.nn.functional as F

from vllm_d2moe.mwq.quantize import MWQTensor, dequantize

NAME = "torch-reference"


def expert_mlp(x: torch.Tensor, gate_up: MWQTensor, down: MWQTensor) -> torch.Tensor:
    """SwiGLU expert: ``down(silu(gate(x)) * up(x))`` for tokens ``x [n, hidden]``, in float32."""
    h = x.float() @ dequantize(gate_up).T
    gate, up = h.chunk(2, dim=-1)
    return (F.silu(gate) * up) @ dequantize(down).T


def grouped_mlp(x, gate_up, down, segments, out) -> None:
    """Every segment's expert MLP, one :func:`expert_mlp` call per segment (see ``kernels/__init__.py``)."""
    for expert, bits, start, end in zip(
        segments.experts, segments.bits, segments.starts, segments.starts[1:]
    ):
        out[start:end] = expert_mlp(x[start:end], gate_up.expert(expert, bits), down.expert(expert, bits))
