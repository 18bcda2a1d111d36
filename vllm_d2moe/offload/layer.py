"""A MoE layer whose experts live in the offload pool, behind :class:`LayerExperts`' interface."""

from itertools import accumulate, pairwise

import torch

from vllm_d2moe.experts import ExpertSegments, backend_forward, routed_sum
from vllm_d2moe.mwq.checkpoint import CheckpointError
from vllm_d2moe.mwq.quantize import MWQError
from vllm_d2moe.offload.faults import ExpertFault
from vllm_d2moe.offload.pipeline import Forecasts


class OffloadedLayerExperts:
    """Experts ``global_ids`` (in local order) of MoE layer ``layer``, served at widths up to ``bits``
    from the manager's pool, loaded from the checkpoint as calls need them."""

    def __init__(self, manager, layer: int, global_ids: list[int], bits: int):
        self.manager = manager
        self.layer = layer
        self.global_ids = list(global_ids)
        self.bits = bits

    @property
    def nbytes(self) -> int:
        """Pool bytes this layer's experts hold now."""
        pool = self.manager.pool
        return sum(pool.slot_nbytes for layer, _, _ in pool.entries() if layer == self.layer)

    def forward(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        local_ids: torch.Tensor,
        widths: torch.Tensor,
        forecasts: Forecasts = (),
    ) -> torch.Tensor:
        """As :meth:`vllm_d2moe.experts.LayerExperts.forward`; every width must be within
        ``[min_bits, bits]``. Decides on the host (which experts to read, their slots): the op
        runs outside CUDA graphs (``vllm_glue/expert_op.py``). ``forecasts``: what the next MoE
        layers are predicted to need (global expert ids), prefetched while this layer computes;
        under expert parallelism only this rank's experts are read."""
        routed = local_ids >= 0
        ids, bits = local_ids[routed].long(), widths[routed].long()
        if bits.numel() and not (self.manager.pool.min_bits <= bits.min() and bits.max() <= self.bits):
            raise MWQError(
                f"MoE layer {self.layer}: widths {bits.min().item()}..{bits.max().item()} asked for; "
                f"this layer serves [{self.manager.pool.min_bits}, {self.bits}]"
            )
        # All resident (the common case under a large enough budget): one backend call over slots,
        # as fast as a resident layer; the per-segment pipeline costs Python work per expert.
        pairs = [divmod(k, 16) for k in torch.unique(ids * 16 + bits).tolist()]
        counts = torch.bincount(ids, minlength=len(self.global_ids)).tolist()
        forecasts = self.manager.local_forecasts(forecasts)
        slots = self.manager.pipeline.resident_slots(
            self.layer,
            [(self.global_ids[e], w) for e, w in pairs],
            {self.global_ids[e]: n for e, n in enumerate(counts) if n},
            forecasts,
        )
        if slots is None:
            failed: list[tuple[int, int, CheckpointError]] = []
            out = routed_sum(x, topk_weights, local_ids, widths, lambda *a: self._compute(*a, failed, forecasts))
            for expert, width, error in failed:
                self._report(expert, width, error, local_ids, widths)
            return out
        # On the ids' device: a CPU table indexed with GPU ids is an error.
        table = torch.tensor([slots.get(g, -1) for g in self.global_ids], device=local_ids.device)
        slot_ids = torch.where(routed, table[local_ids.long().clamp(min=0)], -1)
        pool = self.manager.pool
        return backend_forward(self.manager.backend, pool.gate_up, pool.down, x, topk_weights, slot_ids, widths)

    def _compute(self, xs, segments: ExpertSegments, y, failed: list, forecasts: Forecasts) -> None:
        """Every segment through the load pipeline (``forecasts`` prefetched behind its reads); the
        rows of segments whose expert could not be read are zeroed and their (local expert, width,
        error) appended to ``failed``."""
        manager = self.manager
        bounds = list(pairwise(segments.starts))

        def run_segments(batch: list[tuple[int, int, int]]) -> None:  # width: narrower for a damaged expert
            batch = sorted(batch)
            starts = list(accumulate((bounds[i][1] - bounds[i][0] for i, _, _ in batch), initial=0))
            ready = ExpertSegments(tuple(slot for _, slot, _ in batch), tuple(w for _, _, w in batch), tuple(starts))
            first = bounds[batch[0][0]][0]
            if all(bounds[i][0] == first + start for (i, _, _), start in zip(batch, starts)):
                # Consecutive segments (the common case): their rows are one slice.
                rows = slice(first, first + starts[-1])
                manager.backend.grouped_mlp(xs[rows], manager.pool.gate_up, manager.pool.down, ready, y[rows])
                return
            rows = torch.cat([torch.arange(*bounds[i], device=xs.device) for i, _, _ in batch])
            out = torch.empty(len(rows), y.shape[1], dtype=y.dtype, device=y.device)
            manager.backend.grouped_mlp(xs[rows], manager.pool.gate_up, manager.pool.down, ready, out)
            y[rows] = out

        errors = manager.pipeline.run(
            self.layer,
            [self.global_ids[e] for e in segments.experts],
            list(segments.bits),
            [end - start for start, end in bounds],
            run_segments,
            forecasts,
        )
        for i, error in errors.items():
            start, end = bounds[i]
            y[start:end] = 0
            failed.append((segments.experts[i], segments.bits[i], error))

    def _report(self, expert: int, width: int, error: CheckpointError, local_ids, widths) -> None:
        """Hand the fault to the manager's sink, naming the tokens it affects; raise without one."""
        sink = self.manager.fault_sink
        if sink is None:
            raise error
        tokens = ((local_ids == expert) & (widths == width)).any(dim=1).nonzero().flatten()
        sink(ExpertFault(self.layer, self.global_ids[expert], width, tokens, str(error)))
