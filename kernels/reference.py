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
