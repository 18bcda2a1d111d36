"""One process's expert offloading: the store, the resident pool, the load pipeline and their metrics.

One manager serves every MoE layer of an engine (the budget is global); each
layer gets an :class:`OffloadedLayerExperts` view of it.
"""

import logging
import weakref
from types import ModuleType

from vllm_d2moe.byte_sizes import format_bytes
from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
from vllm_d2moe.offload.faults import FaultSink
from vllm_d2moe.offload.layer import OffloadedLayerExperts
from vllm_d2moe.offload.metrics import OffloadMetrics
from vllm_d2moe.offload.pipeline import Forecasts, LoadPipeline, OffloadPolicy
from vllm_d2moe.offload.pool import ResidentPool
from vllm_d2moe.offload.store import ExpertStore

logger = logging.getLogger(__name__)

_MANAGERS: "weakref.WeakSet[OffloadManager]" = weakref.WeakSet()


class OffloadManager:
    def __init__(
        self,
        checkpoint: MWQCheckpoint,
        budget: int,
        bits: int,
        policy: OffloadPolicy,
        backend: ModuleType,
        device="cpu",
        store: ExpertStore | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        fault_sink: FaultSink | None = None,
    ):
        """``store`` defaults to one over ``checkpoint`` with the policy's O_DIRECT choice.
        ``fault_sink`` gets the experts a layer call could not read (``faults.py``); without
        one such a call raises.

        Under tensor parallelism (``tp_size > 1``) the pool holds this rank's slice of each
        expert and the budget is per rank. Reads are the same as one process's (the slice of a
        plane is not one contiguous byte range, so a rank reads whole sections and keeps its
        slice): a resident width serves any narrower one, an upgrade reads only the planes above.
        """
        layouts = {entry.layout for entry in checkpoint.layers.values()}
        if len(layouts) != 1:
            raise ValueError(
                f"{checkpoint.model_dir}: MoE layers with different expert shapes "
                f"({sorted((layout.hidden, layout.intermediate) for layout in layouts)}) cannot share one offload pool"
            )
        self.backend = backend
        self.fault_sink = fault_sink
        self.policy = policy
        self.store = store or ExpertStore(checkpoint, direct=policy.direct)
        self.pool = ResidentPool(layouts.pop(), bits, budget, backend, device, tp_rank, tp_size)
        self.metrics = OffloadMetrics(self.pool)
        self.pipeline = LoadPipeline(self.store, self.pool, policy, self.metrics)
        self._local_experts: dict[int, set[int]] = {}  # MoE layer -> this rank's global expert ids
        weakref.finalize(self, self.pipeline.close)
        _MANAGERS.add(self)
        non_expert = sum(f.stat().st_size for f in checkpoint.model_dir.glob("*.safetensors"))
        logger.info(
            "d2moe offload: budget %s holds %d experts%s at up to %d bits (%s each, %s allocated); "
            "non-expert weights (not in the budget): %s; %s",
            format_bytes(budget), self.pool.num_slots, f" (rank {tp_rank}'s 1/{tp_size} slices)" if tp_size > 1 else "",
            bits, format_bytes(self.pool.slot_nbytes),
            format_bytes(self.pool.nbytes), format_bytes(non_expert), policy,
        )

    def layer(self, layer: int, global_ids: list[int], bits: int) -> OffloadedLayerExperts:
        self._local_experts[layer] = set(global_ids)
        self.pool.add_layer(layer)
        return OffloadedLayerExperts(self, layer, global_ids, bits)

    def local_forecasts(self, forecasts: Forecasts) -> Forecasts:
        """``forecasts`` restricted to the experts this rank serves (all but under expert parallelism)."""
        local = []
        for later, depth, experts in forecasts:
            mine = self._local_experts.get(later, ())
            local.append((later, depth, {e: v for e, v in experts.items() if e in mine}))
        return local


def metrics_snapshots() -> list[dict]:
    """Current metrics of every live offload manager in this process (one per engine)."""
    return [m.metrics.snapshot() for m in list(_MANAGERS)]


def reset_metrics() -> None:
    """Zero the counters of every live offload manager in this process."""
    for manager in list(_MANAGERS):
        manager.metrics.reset()
