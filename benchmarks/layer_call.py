"""One MoE layer call of the reference model at width 4, outside vLLM, piece by piece.

Layer 0 of the converted reference model (``budget_sweep``'s cache) is loaded
as serving loads it, and one call at 1 and 8 tokens is timed (median of
``--reps``, per-thread CPU time on one thread, so other jobs on a shared
machine do not count) through each layer of the call path:

* ``torch.ops.d2moe.moe_experts``: the op through the dispatcher (compiled mode);
* ``_moe_experts``: the op's Python body called directly (eager mode, where it exists);
* ``WidthSelector``: the width decision (fixed width 4) with its statistics;
* ``LayerExperts.forward``: the expert compute (grouping, gather, kernel, weighted sum);
* an empty call (no pair on this rank): the fixed cost of the C++ forward.

    python benchmarks/layer_call.py [--reps 2000]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from budget_sweep import DEFAULT_MODEL, converted


def median_us(call, reps: int) -> float:
    for _ in range(50):
        call()
    times = []
    for _ in range(reps):
        start = time.thread_time()
        call()
        times.append(time.thread_time() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "vllm_d2moe" / "budget_sweep")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from vllm_d2moe.experts import load_layer_experts
    from vllm_d2moe.kernels import select_backend
    from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
    from vllm_d2moe.router.policy import ServingWidths
    from vllm_d2moe.vllm_glue import expert_op
    from vllm_d2moe.width_selection import WidthSelector

    checkpoint = MWQCheckpoint(converted(DEFAULT_MODEL, args.cache))
    layer = type("Layer", (), {})()
    layer.experts = load_layer_experts(checkpoint, 0, list(range(8)), 4, 0, 1, select_backend("cpu"))
    layer.width_selector = WidthSelector(0, ServingWidths("fixed", (4,)))
    layer_id = expert_op.register_layer(layer)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for tokens in (1, 8):
            for name, us in time_calls(layer, layer_id, tokens, generator, args.reps).items():
                print(f"{tokens} token{'s' if tokens > 1 else ' '}  {name:40s} {us:8.1f} us")


def time_calls(layer, layer_id: int, tokens: int, generator, reps: int) -> dict[str, float]:
    from vllm_d2moe.vllm_glue import expert_op

    x = torch.randn(tokens, 256, generator=generator).bfloat16()
    weights, ids = torch.topk(torch.softmax(torch.randn(tokens, 8, generator=generator), -1), 2)
    ids = ids.int()
    widths = layer.width_selector(x, weights, ids)
    nowhere = torch.full_like(ids, -1)
    calls = {
        "torch.ops.d2moe.moe_experts": lambda: torch.ops.d2moe.moe_experts(x, weights, ids, ids, layer_id),
        "_moe_experts (op body, direct)": lambda: expert_op._moe_experts(x, weights, ids, ids, layer_id),
        "WidthSelector (fixed:4)": lambda: layer.width_selector(x, weights, ids),
        "LayerExperts.forward": lambda: layer.experts.forward(x, weights, ids, widths),
        "LayerExperts.forward, no local pair": lambda: layer.experts.forward(x, weights, nowhere, widths),
    }
    return {name: median_us(call, reps) for name, call in calls.items()}


if __name__ == "__main__":
    main()
