"""Shared, session-scoped fixtures: tiny models of every supported architecture,
their d2moe conversions, and vLLM engine runs over them.

vLLM engines take ~30 s each to start here, so every engine a test needs is
declared up front and all of them run once per session in one subprocess
(``vllm_d2moe.testing.engine_runs``), in vLLM's default process layout (engine
core and worker spawned) unless a run says ``in_process``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_d2moe.testing.engine_runs import Run
from vllm_d2moe.vllm_glue.llm import ENGINE_ENV  # small CPU KV cache (what vLLM reserves per engine)

PROMPTS = [
    "def parse_args(argv):\n",
    "import json\n\nclass",
    "The parser reads",
    "return self.",
]
GROUP_SIZE = 64


class Report:
    """Numbers a test reports (not asserts) for the terminal summary. They travel as the test's
    ``user_properties``, so that pytest-xdist workers hand them to the controller."""

    def __init__(self, node):
        self.node = node

    def add(self, line: str) -> None:
        self.node.user_properties.append(("d2moe", line))


@pytest.fixture
def report(request) -> Report:
    return Report(request.node)


def pytest_terminal_summary(terminalreporter):
    lines = [
        value
        for reports in terminalreporter.stats.values()
        for r in reports
        if getattr(r, "when", None) == "call"
        for key, value in getattr(r, "user_properties", ())
        if key == "d2moe"
    ]
    if lines:
        terminalreporter.section("d2moe measurements")
        for line in lines:
            terminalreporter.write_line(line)


# Session-scoped engine fixtures take minutes; under pytest-xdist (``make test`` runs two workers)
# every module that uses one runs in the same worker, so that the engines start once.
_SHARED_ENGINE_FIXTURES = ("engine_results",)
# Groups xdist should hand out first (in collection order, with --no-loadscope-reorder): the longest.
_LONGEST_GROUPS = ("engine_results", "test_router_serving", "test_offload", "test_prefetch_serving", "test_real_shape",
                   "test_ray", "test_eval", "test_soak")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """One ``xdist_group`` per module (its module-scoped fixtures then set up once), one shared by the
    modules that use a shared engine fixture; the longest groups first."""
    sharing = {
        item.module.__name__: fixture
        for item in items
        for fixture in _SHARED_ENGINE_FIXTURES
        if fixture in getattr(item, "fixturenames", ())
    }
    groups = {}
    for item in items:
        module = item.module.__name__
        groups[item] = sharing.get(module, module)
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    order = {group: i for i, group in enumerate(_LONGEST_GROUPS)}
    items.sort(key=lambda item: order.get(groups[item], len(order)))


@pytest.fixture(scope="session")
def model_zoo(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """``{arch: {"hf": dir, "d2moe": dir}}`` for every supported tiny architecture."""
    from vllm_d2moe.converters.convert import convert
    from vllm_d2moe.mwq.quantize import MWQSpec
    from vllm_d2moe.testing.tiny_models import SUPPORTED_TINY_ARCHS, make_tiny_model

    root = tmp_path_factory.mktemp("models")
    zoo = {}
    for arch in SUPPORTED_TINY_ARCHS:
        hf = make_tiny_model(arch, root / arch)
        d2moe = convert(hf, root / f"{arch}-d2moe", MWQSpec(2, 8, GROUP_SIZE), progress=False)
        zoo[arch] = {"hf": hf, "d2moe": d2moe}
    return zoo


@pytest.fixture(scope="module")
def model(model_zoo) -> Path:
    """The session's tiny Mixtral converted to MWQ 2..8 bits, group 64 (tests damage only copies);
    a module may define its own."""
    return model_zoo["mixtral"]["d2moe"]


@pytest.fixture(scope="module")
def checkpoint(model):
    from vllm_d2moe.mwq.checkpoint import MWQCheckpoint

    return MWQCheckpoint(model)


ROUTER_WIDTHS = (2, 3, 4)
ROUTER_CAPACITIES = (0.3, 0.4, 0.3)


@pytest.fixture(scope="session")
def routed_mixtral(model_zoo, tmp_path_factory) -> Path:
    """The tiny Mixtral's d2moe checkpoint with a seeded random bit-width router (large weights, so
    that choices are far from ties and every width is used) and its calibration."""
    import shutil

    import torch

    from vllm_d2moe.router.model import RouterSet, WidthRouter
    from vllm_d2moe.router.policy import ServingWidths
    from vllm_d2moe.router.simulate import load_simulated_model
    from vllm_d2moe.router.train import calibrate

    dst = tmp_path_factory.mktemp("routed") / "mixtral-routed"
    shutil.copytree(model_zoo["mixtral"]["d2moe"], dst)
    hidden = json.loads((dst / "config.json").read_text())["hidden_size"]
    generator = torch.Generator().manual_seed(0)
    routers = {}
    for layer in range(2):
        router = WidthRouter(num_experts=8, hidden=hidden, num_widths=len(ROUTER_WIDTHS)).requires_grad_(False)
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
        routers[layer] = router
    model = load_simulated_model(dst, ServingWidths("router", ROUTER_WIDTHS), routers)
    windows = torch.randint(3, 500, (8, 64), generator=generator)
    calibration = calibrate(model, windows, ROUTER_WIDTHS)
    RouterSet(ROUTER_WIDTHS, "expert", routers, ROUTER_CAPACITIES, tuple(calibration),
              {"note": "seeded random"}).save(dst)
    return dst


def run_engines(runs: list[Run], workdir: Path, extra_env: dict | None = None) -> tuple[dict, str]:
    """Run ``runs`` in a fresh process; return (results by run name, combined log)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec, out = workdir / "runs.json", workdir / "results.json"
    spec.write_text(json.dumps([r.__dict__ for r in runs]))
    env = {**os.environ, **ENGINE_ENV, **(extra_env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_d2moe.testing.engine_runs", str(spec), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    log = proc.stdout + proc.stderr
    (workdir / "engines.log").write_text(log)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"engine runner failed (exit {proc.returncode}):\n{log[-4000:]}")
    return json.loads(out.read_text()), log


def check_streamed_run(served: dict, name: str) -> str:
    """Assert that run ``name`` (``sample_offload``) gave the ``"resident"`` run's greedy tokens, kept its
    pool within its budget and read experts from disk; return what it measured, for a report line."""
    from vllm_d2moe.byte_sizes import format_bytes

    resident = [o["token_ids"] for o in served["resident"]["outputs"]]
    assert [o["token_ids"] for o in served[name]["outputs"]] == resident
    sampled = served[name]["offload"]
    (metrics,) = sampled["metrics"]  # one engine's pool alive
    assert sampled["max_occupancy_bytes"] <= sampled["max_allocated_bytes"] <= sampled["budget_bytes"]
    total = metrics["total"]
    assert total["misses"] > 0 and total["bytes_read"] > 0
    return (
        f"budget {format_bytes(sampled['budget_bytes'])}, {metrics['pool']['slots']} slots, "
        f"{total['hits']} hits / {total['misses']} reads, {format_bytes(total['bytes_read'])} read, "
        f"compute waited {total['wait_seconds'] * 1e3:.0f} ms; max RSS {format_bytes(sampled['max_rss_bytes'])} "
        f"(all resident: {format_bytes(served['resident']['offload']['max_rss_bytes'])})"
    )


def vocab_size(model_dir: Path) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


def routed_budget(model_dir: Path, experts: int = 3) -> int:
    """A memory budget of ``experts`` experts at 4 bits (the routed model's widest width) per rank."""
    from vllm_d2moe.mwq.checkpoint import MWQCheckpoint
    from vllm_d2moe.offload.pool import expert_nbytes

    # A few bytes over: the CPU kernel's layout adds read slack per tensor.
    return experts * expert_nbytes(MWQCheckpoint(model_dir).layer(0).layout, 4) + 1024


@pytest.fixture(scope="session")
def engine_results(model_zoo, routed_mixtral, tmp_path_factory) -> dict:
    """Greedy outputs (with full log-prob vectors) of every engine the serving tests compare."""
    # Comparisons of numbers run in process (no engine-core and worker processes to spawn: the
    # suite's time is mostly engines starting); outputs do not depend on the layout, which the
    # spawned twins below, the OpenAI servers, test_router_serving and the wheel check exercise.
    runs = []
    for arch, dirs in model_zoo.items():
        logprobs = vocab_size(dirs["hf"])
        runs.append(
            Run(f"{arch}/unquantized", str(dirs["hf"]), PROMPTS, logprobs=logprobs,
                score_against=f"{arch}/unquantized", in_process=True)
        )
        runs.append(
            Run(f"{arch}/d2moe-8", str(dirs["d2moe"]), PROMPTS, quantization="d2moe",
                logprobs=logprobs, score_against=f"{arch}/unquantized", in_process=True)
        )
    mixtral = str(model_zoo["mixtral"]["d2moe"])
    logprobs = vocab_size(mixtral)
    runs += [
        Run(
            "mixtral/d2moe-2",
            mixtral,
            PROMPTS,
            hf_overrides={"quantization_config": {"quant_method": "d2moe", "bits": 2}},
            logprobs=logprobs,
            score_against="mixtral/unquantized",
        ),
        # The other linear layers and the output head as weight-only int8 / int4, or int8 with int8
        # activations (option dense).
        *(Run(f"mixtral/d2moe-8/dense-{mode}", mixtral, PROMPTS, logprobs=logprobs, in_process=True,
              score_against="mixtral/unquantized",
              hf_overrides={"quantization_config": {"quant_method": "d2moe", "bits": 8, "dense": mode}})
          for mode in ("int8", "int4", "w8a8")),
        # No --quantization flag: detected from config.json; torch.compile on.
        Run("mixtral/auto-compiled", mixtral, PROMPTS, enforce_eager=False, in_process=True),
        # In-process twins of default-layout engines (a fixed width; the router under a memory
        # budget): outputs must not depend on the process layout (test_process_layout.py). The
        # router runs without per-batch capacities: a spawned engine core may start stepping before
        # all prompts arrived, so its batches (and what capacities allow in them) can differ.
        Run("mixtral/d2moe-2/in-process", mixtral, PROMPTS, in_process=True,
            hf_overrides={"quantization_config": {"quant_method": "d2moe", "bits": 2}}),
        *(Run(f"mixtral/routed-budget{suffix}", str(routed_mixtral), PROMPTS, in_process=bool(suffix),
              hf_overrides={"quantization_config": {"quant_method": "d2moe", "capacities": "off",
                                                    "memory_budget": routed_budget(routed_mixtral)}})
          for suffix in ("", "/in-process")),
        Run(
            "mixtral/bits-out-of-range",
            mixtral,
            PROMPTS,
            quantization="d2moe",
            hf_overrides={"quantization_config": {"quant_method": "d2moe", "bits": 1}},
            in_process=True,
        ),
    ]
    results, _ = run_engines(runs, tmp_path_factory.mktemp("engines"))
    return results
