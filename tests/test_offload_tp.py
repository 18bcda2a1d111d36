"""Expert offloading under tensor parallelism: each rank's pool holds its slice of every expert.

Both ranks of TP=2 run in this one process, one :class:`OffloadManager` each (as each vLLM
worker has one), against the same rank's slices held resident (``load_layer_experts``). They
agree up to the float32 order of each token's weighted sum (see ``test_offload.py``): rtol 1e-5.
The two ranks' partial sums add up to the one-process output up to the order of the down
projection's sum, split in two: rtol 1e-4. Reads are counted through the store's ``read_at``
hook. The start-up budget check runs where vLLM runs it, in ``VllmConfig`` (no engine starts).
"""

from pathlib import Path

import pytest
import torch

from vllm_d2moe.byte_sizes import format_bytes
from vllm_d2moe.experts import load_layer_experts
from vllm_d2moe.kernels import load_backend
from vllm_d2moe.mwq.checkpoint import MWQCheckpoint, read_buffered
from vllm_d2moe.offload import OffloadManager
from vllm_d2moe.offload.pipeline import OffloadPolicy
from vllm_d2moe.offload.pool import BudgetError, expert_nbytes
from vllm_d2moe.offload.store import ExpertStore

MIN_BITS, MAX_BITS = 2, 8  # the session model_zoo conversion's widths
TP = 2
EXPERTS = 8
POLICIES = {
    "pipeline": OffloadPolicy(),
    "on-demand": OffloadPolicy(order="id", overlap=False, reuse=False, keep=False),
}


def slice_bytes(checkpoint: MWQCheckpoint, bits: int = MAX_BITS) -> int:
    return expert_nbytes(checkpoint.layer(0).layout, bits, TP)


def slice_budget(checkpoint: MWQCheckpoint, slots: int) -> int:
    # A few bytes over: the CPU kernel's layout adds read slack per tensor.
    return slots * slice_bytes(checkpoint) + 1024


class CountingRead:
    """A ``read_at`` that counts the store's positional reads and their bytes."""

    def __init__(self):
        self.calls = self.nbytes = 0

    def __call__(self, fd: int, offset: int, length: int, into=None):
        self.calls += 1
        self.nbytes += length
        return read_buffered(fd, offset, length, into)


def test_slices_split_every_array_evenly(checkpoint):
    layout = checkpoint.layer(0).layout
    whole = checkpoint.read_expert(0, 3, MAX_BITS)
    manager = OffloadManager(checkpoint, slice_budget(checkpoint, 1), MAX_BITS, OffloadPolicy(),
                             load_backend("reference"), tp_rank=1, tp_size=TP)
    assert manager.pool.slot_nbytes == slice_bytes(checkpoint) == expert_nbytes(layout, MAX_BITS) // TP
    assert 2 * slice_bytes(checkpoint) == sum(t.nbytes for t in whole.values())


@pytest.mark.parametrize("rank", range(TP))
def test_wider_resident_slice_serves_narrower_and_upgrades_read_only_the_planes_above(checkpoint, rank):
    """Experts 0 and 1 resident at 4 bits, then asked for at 2, 3 and 4 in one call: nothing is
    read. Asked for at 6: only sections 3..4 (widths 5 and 6) are read, one read per expert."""
    layout = checkpoint.layer(0).layout
    backend = load_backend("reference")
    reads = CountingRead()
    manager = OffloadManager(checkpoint, slice_budget(checkpoint, 4), MAX_BITS, OffloadPolicy(), backend,
                             store=ExpertStore(checkpoint, read_at=reads), tp_rank=rank, tp_size=TP)
    offloaded = manager.layer(0, list(range(EXPERTS)), MAX_BITS)
    resident = load_layer_experts(checkpoint, 0, list(range(EXPERTS)), MAX_BITS, rank, TP, backend)
    gen = torch.Generator().manual_seed(rank)
    x, weights = torch.randn(3, 128, generator=gen), torch.rand(3, 2, generator=gen)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])

    def call(widths: list[list[int]]) -> tuple[int, int]:
        """Run one call; return the reads and bytes it made (store calls, metrics' bytes)."""
        calls, before = reads.calls, manager.metrics.snapshot()["total"]["bytes_read"]
        widths = torch.tensor(widths, dtype=torch.int8)
        torch.testing.assert_close(offloaded.forward(x, weights, ids, widths),
                                   resident.forward(x, weights, ids, widths), rtol=1e-5, atol=1e-6)
        return reads.calls - calls, manager.metrics.snapshot()["total"]["bytes_read"] - before

    prefix = layout.nbytes
    assert call([[4, 4]] * 3) == (2, 2 * prefix(4))
    assert call([[2, 3], [3, 4], [4, 2]]) == (0, 0)
    assert call([[6, 6]] * 3) == (2, 2 * (prefix(6) - prefix(4)))
    assert call([[2, 6], [3, 5], [4, 4]]) == (0, 0)
    assert sorted(manager.pool.entries()) == [(0, 0, 6), (0, 1, 6)]


@pytest.mark.parametrize("policy, slots", [("pipeline", 1), ("pipeline", 3), ("pipeline", 20), ("on-demand", 3)])
def test_ranks_equal_their_resident_slices_and_add_up_to_one_process(checkpoint, policy, slots):
    """Two layers share each rank's pool; the ranks serve experts 1, 3, 4, 6 and 7 at mixed widths."""
    backend = load_backend("reference")
    global_ids = [1, 3, 4, 6, 7]
    layout = checkpoint.layer(0).layout
    gen = torch.Generator().manual_seed(slots)
    calls, widest = [], {}  # widest: (layer, expert) -> widest width asked
    for call in range(6):
        tokens = 1 + 3 * call
        x, weights = torch.randn(tokens, 128, generator=gen), torch.rand(tokens, 2, generator=gen)
        ids = torch.randint(-1, len(global_ids), (tokens, 2), generator=gen)
        widths = torch.randint(MIN_BITS, MAX_BITS + 1, (tokens, 2), generator=gen).to(torch.int8)
        calls.append((call % 2, (x, weights, ids, widths)))
        for e, w in zip(ids[ids >= 0].tolist(), widths[ids >= 0].tolist()):
            key = (call % 2, global_ids[e])
            widest[key] = max(widest.get(key, 0), w)
    rank_outputs = []
    for rank in range(TP):
        manager = OffloadManager(checkpoint, slice_budget(checkpoint, slots), MAX_BITS, POLICIES[policy],
                                 backend, tp_rank=rank, tp_size=TP)
        assert manager.pool.num_slots == slots
        layers = {
            layer: (load_layer_experts(checkpoint, layer, global_ids, MAX_BITS, rank, TP, backend),
                    manager.layer(layer, global_ids, MAX_BITS))
            for layer in (0, 1)
        }
        outputs = []
        for layer, args in calls:
            resident, offloaded = layers[layer]
            outputs.append(offloaded.forward(*args))
            torch.testing.assert_close(outputs[-1], resident.forward(*args), rtol=1e-5, atol=1e-6)
        rank_outputs.append(outputs)
        total = manager.metrics.snapshot()["total"]
        assert total["misses"] > 0
        if policy == "pipeline" and slots >= 2 * len(global_ids):  # nothing evicted: each section read once
            assert total["bytes_read"] == sum(layout.nbytes(w) for w in widest.values())
        assert manager.pool.occupancy_nbytes <= manager.pool.nbytes <= manager.pool.budget
    one_process = {layer: load_layer_experts(checkpoint, layer, global_ids, MAX_BITS, 0, 1, backend)
                   for layer in (0, 1)}
    for i, (layer, args) in enumerate(calls):
        torch.testing.assert_close(rank_outputs[0][i] + rank_outputs[1][i], one_process[layer].forward(*args),
                                   rtol=1e-4, atol=1e-5)


def test_budget_below_one_slice_names_the_minimum_for_this_rank(checkpoint):
    backend = load_backend("reference")
    need, whole = slice_bytes(checkpoint), expert_nbytes(checkpoint.layer(0).layout, MAX_BITS)
    budget = slice_budget(checkpoint, 1)
    assert budget < whole  # fits one rank's slice, not a whole expert
    manager = OffloadManager(checkpoint, budget, MAX_BITS, OffloadPolicy(), backend, tp_rank=1, tp_size=TP)
    assert manager.pool.num_slots == 1
    with pytest.raises(BudgetError, match=f"at least {whole} bytes \\({format_bytes(whole)}\\), one expert at"):
        OffloadManager(checkpoint, budget, MAX_BITS, OffloadPolicy(), backend)
    with pytest.raises(BudgetError, match=f"at least {need} bytes \\({format_bytes(need)}\\), this rank's 1/2 "
                                          "slice of one expert at that width \\(tensor-parallel size 2\\)"):
        OffloadManager(checkpoint, need - 1, MAX_BITS, OffloadPolicy(), backend, tp_rank=0, tp_size=TP)


def _engine_config(model: Path, budget: int, tensor_parallel_size: int, enable_expert_parallel: bool = False):
    """vLLM's engine config as ``vllm serve`` builds it in the launching process (no engine starts)."""
    from vllm.engine.arg_utils import EngineArgs

    overrides = {"quantization_config": {"quant_method": "d2moe", "memory_budget": budget}}
    return EngineArgs(model=str(model), tensor_parallel_size=tensor_parallel_size, hf_overrides=overrides,
                      enable_expert_parallel=enable_expert_parallel).create_engine_config()


def test_start_up_checks_the_budget_against_one_ranks_share(model, checkpoint):
    """Before any worker starts: under TP=2 a budget of one slice is enough; one process, or TP=2
    with expert parallelism (whole experts per rank), needs a whole expert; below one slice the
    error names the slice."""
    need, whole = slice_bytes(checkpoint), expert_nbytes(checkpoint.layer(0).layout, MAX_BITS)
    assert _engine_config(model, need, TP).quant_config.memory_budget == need
    for tp, ep in ((1, False), (TP, True)):
        with pytest.raises(ValueError, match=f"needs at least {whole} bytes \\({format_bytes(whole)}\\), one expert"):
            _engine_config(model, need, tp, ep)
    with pytest.raises(ValueError, match=f"needs at least {need} bytes \\({format_bytes(need)}\\), this rank's 1/2"):
        _engine_config(model, need - 1, TP)
