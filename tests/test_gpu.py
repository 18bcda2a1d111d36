"""Tests that need a CUDA device (marker ``gpu``; skipped without one). ``scripts/gpu_check.sh``
runs them on a GPU machine; on CPUs only the skip is exercised.

- the Triton MWQ kernel against the float64 reference on CUDA: every width 2..8 in one launch,
  float32 (TF32), float16 and bfloat16 inputs, shapes no tile divides, tolerances as in
  ``test_kernels.py`` (:func:`test_kernels.tolerance`);
- the expert op between CUDA-graph pieces, the way vLLM's piecewise graphs run it (graphs
  before and after it replayed, the op eager in between, writing into the buffer the first
  graph allocated), against the same calls without graphs;
- vLLM's own config for a d2moe model on CUDA: the op a splitting op, piecewise graphs;
- served greedy completions: CUDA graphs on vs eager, and under a memory budget vs without.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_kernels import float64_mlp, random_layer, tolerance

from vllm_d2moe.experts import ExpertSegments, LayerExperts
from vllm_d2moe.mwq.quantize import MWQSpec
from vllm_d2moe.testing.compare import diverge_only_at_near_ties

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = ["def parse_args(argv):\n", "import json\n\nclass", "The parser reads", "return self."]


@pytest.fixture(scope="module")
def triton_backend():
    from vllm_d2moe import kernels

    return kernels.load_backend("triton_mwq")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_kernel_matches_float64_on_cuda(triton_backend, dtype):
    """35 segments in one call: 5 experts x widths 2..8, of 1, 3, 16, 17 and 70 tokens;
    hidden 1000 (K tiles of 64 leave 40), intermediate 360, group 40."""
    torch.manual_seed(1)
    spec, hidden, inter = MWQSpec(2, 8, 40), 1000, 360
    gate_up, down = random_layer(spec, 5, hidden, inter, "cuda")
    plan = [(e, bits, (1, 3, 16, 17, 70)[e]) for bits in range(2, 9) for e in range(5)]
    starts = [0]
    for *_, tokens in plan:
        starts.append(starts[-1] + tokens)
    segments = ExpertSegments(tuple(p[0] for p in plan), tuple(p[1] for p in plan), tuple(starts))
    x = torch.randn(starts[-1], hidden, device="cuda").to(dtype)
    out = torch.full((starts[-1], hidden), float("nan"), device="cuda")
    triton_backend.grouped_mlp(x, gate_up, down, segments, out)
    torch.cuda.synchronize()
    assert not out.isnan().any(), "rows left unwritten"
    tol = tolerance(triton_backend, dtype)
    for (e, bits, _), a, b in zip(plan, starts, starts[1:]):
        want = float64_mlp(x[a:b], gate_up.expert(e, bits), down.expert(e, bits))
        torch.testing.assert_close(
            out[a:b].cpu().double(), want, rtol=tol, atol=tol * want.abs().max().item(),
            msg=lambda m, e=e, bits=bits: f"expert {e} at {bits} bits ({dtype}): {m}",
        )


class _Layer:
    """What the op looks a layer up as: a width selector and experts (a MoE method has both)."""

    def __init__(self, width_selector, experts):
        self.width_selector, self.experts = width_selector, experts


def test_op_runs_between_cuda_graph_pieces(triton_backend):
    """vLLM's piecewise CUDA graphs around ``d2moe::moe_experts``: graph A computes the op's
    inputs and allocates its output, the op runs eagerly, graph B reads the output. Replays with
    new inputs must give what the same calls give without graphs. (The op itself cannot be
    captured: it decides on the host; hence a splitting op.)"""
    from vllm_d2moe.router.policy import ServingWidths
    from vllm_d2moe.vllm_glue import expert_op
    from vllm_d2moe.width_selection import WidthSelector

    torch.manual_seed(2)
    spec, tokens, hidden, inter, experts, top_k = MWQSpec(2, 6, 32), 7, 96, 64, 4, 2
    layer = LayerExperts(*random_layer(spec, experts, hidden, inter, "cuda"), spec.max_bits, triton_backend)
    method = _Layer(WidthSelector(0, ServingWidths("fixed", (5,))), layer)
    layer_id = expert_op.register_layer(method)
    proj = torch.randn(hidden, experts, device="cuda")
    static_in = torch.zeros(tokens, hidden, device="cuda")

    def piece_a():
        x = static_in * 0.5
        weights, ids = torch.topk(torch.softmax(x @ proj, dim=-1), top_k)
        return x, weights, ids.to(torch.int32), torch.empty_like(x)

    def op(x, weights, ids, out):
        torch.ops.d2moe.moe_experts(x, weights, ids, ids, out, layer_id)

    def eager(inp):
        static_in.copy_(inp)
        x, weights, ids, out = piece_a()
        op(x, weights, ids, out)
        return out + x

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture (Triton compiles here)
        eager(torch.randn(tokens, hidden, device="cuda"))
    torch.cuda.current_stream().wait_stream(stream)
    graph_a, graph_b = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph_a):
        x, weights, ids, out = piece_a()
    op(x, weights, ids, out)
    with torch.cuda.graph(graph_b):
        y = out + x
    previous = None
    for _ in range(3):
        inp = torch.randn(tokens, hidden, device="cuda")
        static_in.copy_(inp)
        graph_a.replay()
        op(x, weights, ids, out)
        graph_b.replay()
        got = y.clone()
        assert previous is None or not torch.equal(got, previous), "graph B replayed a stale output"
        torch.testing.assert_close(got, eager(inp), rtol=1e-5, atol=1e-5)
        previous = got


@pytest.fixture(scope="module")
def tiny_d2moe(tmp_path_factory) -> Path:
    """The tiny Mixtral converted to a 2..8-bit d2moe checkpoint."""
    from vllm_d2moe.converters.convert import convert
    from vllm_d2moe.testing.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("gpu-models")
    return convert(make_tiny_model("mixtral", root / "mixtral"), root / "mixtral-d2moe", MWQSpec(2, 8, 64),
                   progress=False)


def test_vllm_config_keeps_the_op_out_of_cuda_graphs(tiny_d2moe):
    from vllm.config import CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs

    from vllm_d2moe.vllm_glue.expert_op import OP_NAME

    config = EngineArgs(model=str(tiny_d2moe), enforce_eager=False).create_engine_config()
    assert config.model_config.quantization == "d2moe"
    assert OP_NAME in config.compilation_config.splitting_ops
    assert config.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert config.compilation_config.splitting_ops_contain_attention()


def _run_engines(runs: list[dict], workdir: Path) -> dict:
    """``vllm_d2moe.testing.engine_runs`` in a fresh process (vLLM spawns from ``__main__``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec, out = workdir / "runs.json", workdir / "results.json"
    spec.write_text(json.dumps(runs))
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_d2moe.testing.engine_runs", str(spec), str(out)],
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, capture_output=True, text=True, timeout=900,
    )
    (workdir / "engines.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0 and out.exists(), (proc.stdout + proc.stderr)[-5000:]
    results = json.loads(out.read_text())
    for name, result in results.items():
        assert "error" not in result, f"{name}: {result['error']}"
    return results


def _tokens(result: dict) -> list[list[int]]:
    return [o["token_ids"] for o in result["outputs"]]


@pytest.fixture(scope="module")
def served(tiny_d2moe, tmp_path_factory) -> dict:
    from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
    from vllm_d2moe.offload.pool import expert_nbytes

    checkpoint = MWQCheckpoint(tiny_d2moe)
    # Room for 3 experts at the widest width: far fewer than a step routes to, so experts are read.
    budget = 3 * expert_nbytes(checkpoint.layer(0).layout, 8) + 4096
    base = {"model": str(tiny_d2moe), "prompts": PROMPTS, "max_tokens": 16, "dtype": "bfloat16"}
    runs = [
        {**base, "name": "eager", "enforce_eager": True, "logprobs": 20},
        {**base, "name": "compiled-no-graphs", "enforce_eager": False,
         "compilation_config": {"cudagraph_mode": "NONE"}},
        {**base, "name": "cuda-graphs", "enforce_eager": False},
        {**base, "name": "cuda-graphs-budget", "enforce_eager": False,
         "hf_overrides": {"quantization_config": {"quant_method": "d2moe", "memory_budget": budget}}},
    ]
    return _run_engines(runs, tmp_path_factory.mktemp("gpu-engines"))


def test_served_completion_with_cuda_graphs_matches_the_same_compiled_model_without(served):
    """Piecewise CUDA graphs around the d2moe op replay what the same compiled pieces compute
    without graphs (they split at the op either way): equal greedy tokens. Stale inputs or
    outputs of the op in a replayed graph would change them."""
    assert _tokens(served["cuda-graphs"]) == _tokens(served["compiled-no-graphs"])


def test_served_completion_with_cuda_graphs_against_eager(served, report):
    """Reported, not asserted: torch.compile and eager bf16 round differently, and on CPUs vLLM's
    own unquantized tiny Mixtral already picks tokens far from eager's top once in a while
    (compiled vs eager, position 7 of two of four prompts), so a disagreement here says nothing
    about d2moe by itself."""
    problems = diverge_only_at_near_ties(served["eager"], served["cuda-graphs"])
    report.add(f"gpu: CUDA graphs vs eager (tiny Mixtral, bf16): "
               f"{'equal up to near-ties' if not problems else '; '.join(problems)}")


def test_served_completion_under_a_memory_budget_matches_resident(served):
    """The same kernel on the same rows, whether the experts are resident or streamed (and they were)."""
    metrics = served["cuda-graphs-budget"].get("offload_metrics") or [{}]
    assert metrics[0].get("total", {}).get("misses", 0) > 0, "the budget run read no expert"
    assert _tokens(served["cuda-graphs-budget"]) == _tokens(served["cuda-graphs"])
