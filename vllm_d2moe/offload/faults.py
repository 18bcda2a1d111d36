"""Expert reads that failed for good during a layer call, and the tokens they left uncomputed.

A corrupt or truncated blob, or a disk error that outlasts the store's
retries, must fail the requests whose tokens needed that expert, not the whole
batch. With a fault sink (:class:`vllm_d2moe.offload.OffloadManager`'s
``fault_sink``) a layer call computes every other segment, leaves the failed
pairs' contribution at zero and hands the sink one :class:`ExpertFault` per
failed (expert, width); the serving glue (``vllm_glue/request_faults.py``)
turns them into errors of exactly those tokens' requests. Without a sink the
call raises the read's error, as any direct user of the layer expects.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertFault:
    layer: int
    expert: int  # global id
    width: int
    tokens: torch.Tensor  # indices (into the layer call's tokens) of the tokens routed to it at that width
    error: str  # the store's message: file, layer, expert and what is wrong

    def __str__(self) -> str:
        return f"MoE layer {self.layer} expert {self.expert} at {self.width} bits could not be read: {self.error}"


FaultSink = Callable[[ExpertFault], None]
