"""``d2moe placement`` on the tiny Mixtral checkpoint against hand-computed sizes.

Tiny Mixtral: 2 MoE layers, 8 experts, top-2, hidden 128, expert width 256,
MWQ widths 2..8, group 64. One expert's blob (see mwq/layout.py; every piece is a
multiple of 64 bytes here, so no padding):
  base (2 bits): gate_up [512, 128] 16384 + scale 2048 + zero 2048 (fp16, 2 groups a row)
                 down    [128, 256]  8192 + scale 1024 + zero 1024 (4 groups a row) = 30720
  each plane:    gate_up 8192 + scale codes 512, down 4096 + scale codes 256         = 13056
                 (4-bit codes, two groups a byte: 1 and 2 bytes a row)
  width 8 = 30720 + 6 * 13056 = 109056 bytes, width 4 = 56832.
A tensor-parallel slice (expert width 128) is exactly half: 54528 at width 8.
"""

import json

import pytest

from vllm_d2moe.byte_sizes import parse_bytes
from vllm_d2moe.cli import main
from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
from vllm_d2moe.placement import Device, ep_experts, parse_devices, plan_placement

FULL_8, FULL_4, HALF_8 = 109056, 56832, 54528
TOP_K = 2


@pytest.fixture(scope="module")
def ckpt(model_zoo) -> MWQCheckpoint:
    return MWQCheckpoint(model_zoo["mixtral"]["d2moe"])


@pytest.fixture(scope="module")
def dense_bytes(ckpt) -> int:
    return sum(p.stat().st_size for p in ckpt.model_dir.glob("*.safetensors"))


def test_parse_devices_and_sizes():
    assert parse_devices("cpu:8GiB, cuda:0:24GB") == [Device("cpu", 8 * 2**30), Device("cuda:0", 24 * 10**9)]
    assert parse_bytes("1.5MiB", "size") == 1572864
    with pytest.raises(ValueError, match="not a memory size"):
        parse_bytes("8 gigs", "size")
    with pytest.raises(ValueError, match="NAME:SIZE"):
        parse_devices("24GiB")


def test_expert_parallel_assignment_matches_vllm():
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    for experts, ranks in [(8, 2), (8, 3), (60, 7)]:
        for rank in range(ranks):
            _, expert_map, _ = determine_expert_map(ranks, rank, experts)
            assert list(ep_experts(experts, ranks, rank)) == (expert_map >= 0).nonzero().flatten().tolist()


def test_tensor_parallel_budget_fills_in_layer_order(ckpt, dense_bytes):
    # Rank 0: room for 13 slices (13 * HALF_8 <= budget < 14 * HALF_8); rank 1 for all 16.
    memories = [dense_bytes // 2 + 13 * HALF_8 + 100, dense_bytes // 2 + 16 * HALF_8]
    plans = plan_placement(ckpt, [Device("a", m) for m in memories], top_k=TOP_K)
    first, second = plans
    assert first.resident == {0: list(range(8)), 1: list(range(5))}
    assert first.resident_bytes == 13 * HALF_8
    # 3 missing experts, each routed to by 2/8 of the tokens, each miss reads the whole width-8 prefix.
    assert first.disk_bytes_per_token == 3 * (2 / 8) * FULL_8
    assert second.resident == {0: list(range(8)), 1: list(range(8))}
    assert second.disk_bytes_per_token == 0
    assert first.bytes_per_width[8] == 16 * HALF_8
    assert first.bytes_per_width[2] == 16 * 30720 // 2


def test_expert_parallel_with_routing_stats(ckpt, dense_bytes):
    # Layer 1: experts 4 and 7 take all of its tokens, 3:1. Rank 1 serves experts 4-7
    # and has room for 2 whole experts at width 4: the two hottest ones, layer 1's 4 and 7.
    stats = {"layers": {"1": [0, 0, 0, 0, 3, 0, 0, 1]}}
    devices = [Device("a", 10**9), Device("b", dense_bytes // 2 + 2 * FULL_4)]
    first, second = plan_placement(
        ckpt, devices, bits=4, expert_parallel=True, top_k=TOP_K, routing_stats=stats
    )
    assert first.experts == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    assert first.disk_bytes_per_token == 0
    assert second.resident == {0: [], 1: [4, 7]}
    # Misses: layer 0's experts 4-7 at 2/8 each (uniform); layer 1's 5 and 6 are never routed to.
    assert second.disk_bytes_per_token == 4 * (2 / 8) * FULL_4


def test_reserve_and_width_checks(ckpt, dense_bytes):
    plans = plan_placement(ckpt, [Device("a", dense_bytes + 16 * FULL_8)], reserve=FULL_8, top_k=TOP_K)
    assert sum(map(len, plans[0].resident.values())) == 15
    with pytest.raises(ValueError, match="outside this checkpoint's widths"):
        plan_placement(ckpt, [Device("a", 10**9)], bits=9, top_k=TOP_K)


def test_command_prints_the_plan(ckpt, dense_bytes, tmp_path, capsys):
    stats = tmp_path / "routing.json"
    stats.write_text(json.dumps({"layers": {"0": [1] * 8}}))
    memory = dense_bytes // 2 + 13 * HALF_8 + 100
    assert (
        main(
            [
                "placement",
                str(ckpt.model_dir),
                "--devices",
                f"cpu:{memory},cuda:0:1GiB",
                "--routing-stats",
                str(stats),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "tensor parallel 2: each rank holds a 1/2 slice of every expert" in out
    assert "rank 0 cpu" in out and "rank 1 cuda:0 (1.00 GiB)" in out
    assert "resident at 8 bits: 13/16 experts, 692.25 KiB" in out  # 13 * HALF_8
    assert "    layer 1: experts 5-7" in out
    assert "expected disk reads per token: 79.88 KiB" in out  # 3 * 2/8 * FULL_8
    assert main(["placement", str(ckpt.model_dir), "--devices", "cpu"]) == 1
