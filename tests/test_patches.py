"""vllm_glue/patches.py: the version guard, applying each patch once, and the CUDA-graph
settings a d2moe model gets (expert_op.keep_out_of_cuda_graphs, on vLLM's real config class)."""

import logging
import os
import subprocess
import sys

import pytest

from vllm_d2moe import SUPPORTED_VLLM_VERSIONS
from vllm_d2moe.vllm_glue import patches


def test_supported_versions_pass_and_a_local_build_tag_does_not_matter(monkeypatch):
    monkeypatch.delenv(patches.ALLOW_UNTESTED_ENV, raising=False)
    for version in SUPPORTED_VLLM_VERSIONS:
        assert patches.check_vllm_version(version) == version
        assert patches.check_vllm_version(version + "+cu129") == version + "+cu129"


@pytest.mark.parametrize("version", ["0.31.9", "0.32.1", "0.32.0rc1", "0.32.1.dev4+g1234abc"])
def test_other_versions_are_refused_naming_both(monkeypatch, version):
    monkeypatch.delenv(patches.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(patches.UnsupportedVLLMVersion) as error:
        patches.check_vllm_version(version)
    message = str(error.value)
    assert f"vLLM {version} is installed" in message
    assert all(v in message for v in SUPPORTED_VLLM_VERSIONS)
    assert patches.ALLOW_UNTESTED_ENV in message


def test_the_override_allows_another_version_with_a_warning(monkeypatch, caplog):
    monkeypatch.setenv(patches.ALLOW_UNTESTED_ENV, "1")
    with caplog.at_level(logging.WARNING, logger=patches.__name__):
        assert patches.check_vllm_version("0.33.0") == "0.33.0"
    assert "vLLM 0.33.0" in caplog.text and "not tested" in caplog.text
    monkeypatch.setenv(patches.ALLOW_UNTESTED_ENV, "yes")  # only "1" overrides
    with pytest.raises(patches.UnsupportedVLLMVersion):
        patches.check_vllm_version("0.33.0")


def test_apply_wraps_each_method_once():
    patches.apply()  # whatever registration already did
    wrapped = {p.name: patches.wrapped(p) for p in patches.PATCHES}
    assert patches.apply() == []
    for patch in patches.PATCHES:
        method = patches.wrapped(patch)
        assert patches.is_applied(patch) and method is wrapped[patch.name], patch.name
        # One layer of wrapping over vLLM's own method.
        assert not hasattr(method.__wrapped__, "_d2moe_patch"), patch.name
        assert patch.why and "\n" not in patch.why
    assert len({p.name for p in patches.PATCHES}) == len(patches.PATCHES)


def _register_under(version: str, allow: bool) -> subprocess.CompletedProcess:
    """``register()`` in a fresh process whose vLLM reports ``version`` (patches are per process)."""
    code = (
        f"import vllm; vllm.__version__ = {version!r}\n"
        "import vllm_d2moe\n"
        "from vllm_d2moe.vllm_glue import patches\n"
        "vllm_d2moe.register()\n"
        "print('registered', all(patches.is_applied(p) for p in patches.PATCHES))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != patches.ALLOW_UNTESTED_ENV}
    if allow:
        env[patches.ALLOW_UNTESTED_ENV] = "1"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_register_refuses_an_unsupported_vllm_and_the_override_lets_it_start():
    refused = _register_under("0.99.0", allow=False)
    assert refused.returncode != 0
    assert "UnsupportedVLLMVersion" in refused.stderr and "vLLM 0.99.0 is installed" in refused.stderr
    assert "registered" not in refused.stdout
    allowed = _register_under("0.99.0", allow=True)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "registered True" in allowed.stdout
    assert "not tested" in allowed.stderr


# --- CUDA graphs: the expert op is a splitting op, full graphs are off ---


def _compilation_config(cudagraph_mode, splitting_ops=None):
    from vllm.config import CompilationConfig, CompilationMode

    config = CompilationConfig(
        mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=cudagraph_mode, splitting_ops=splitting_ops
    )
    config.set_splitting_ops_for_v1("allgather_reducescatter")  # what VllmConfig does, CUDA or not
    return config


def test_default_cuda_graphs_become_piecewise_around_the_op():
    from vllm.config import CUDAGraphMode

    from vllm_d2moe.vllm_glue.expert_op import OP_NAME, keep_out_of_cuda_graphs

    config = _compilation_config(CUDAGraphMode.FULL_AND_PIECEWISE)
    attention = list(config.splitting_ops)
    keep_out_of_cuda_graphs(config, "d2moe")
    assert config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert config.splitting_ops == attention + [OP_NAME]
    keep_out_of_cuda_graphs(config, "d2moe")  # idempotent (a config may be rebuilt)
    assert config.splitting_ops.count(OP_NAME) == 1
    # The op is found by the same rule vLLM's graph splitter uses.
    import torch
    from vllm.compilation.partition_rules import should_split

    import vllm_d2moe.vllm_glue.expert_op  # noqa: F401  (registers the op)

    graph = torch.fx.Graph()
    node = graph.call_function(torch.ops.d2moe.moe_experts.default, ())
    assert should_split(node, config.splitting_ops)


def test_other_models_and_graphless_configs_are_left_alone():
    from vllm.config import CUDAGraphMode

    from vllm_d2moe.vllm_glue.expert_op import OP_NAME, keep_out_of_cuda_graphs

    for quantization in (None, "fp8"):
        config = _compilation_config(CUDAGraphMode.FULL_AND_PIECEWISE)
        keep_out_of_cuda_graphs(config, quantization)
        assert config.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE and OP_NAME not in config.splitting_ops
    cpu = _compilation_config(CUDAGraphMode.NONE, splitting_ops=[])  # vLLM's CPU platform: no splitting
    keep_out_of_cuda_graphs(cpu, "d2moe")
    assert cpu.cudagraph_mode == CUDAGraphMode.NONE and cpu.splitting_ops == []


def test_compiled_without_graphs_splits_where_graphs_would():
    """So that a run with graphs and one without compile the same pieces (and give equal tokens)."""
    from vllm.config import CUDAGraphMode

    from vllm_d2moe.vllm_glue.expert_op import OP_NAME, keep_out_of_cuda_graphs

    config = _compilation_config(CUDAGraphMode.NONE)
    keep_out_of_cuda_graphs(config, "d2moe")
    assert config.cudagraph_mode == CUDAGraphMode.NONE and OP_NAME in config.splitting_ops


def test_full_graphs_without_piecewise_splitting_are_turned_off(caplog):
    from vllm.config import CUDAGraphMode

    from vllm_d2moe.vllm_glue.expert_op import keep_out_of_cuda_graphs

    config = _compilation_config(CUDAGraphMode.FULL, splitting_ops=[])  # a user's "one full graph"
    with caplog.at_level(logging.WARNING, logger="vllm_d2moe.vllm_glue.expert_op"):
        keep_out_of_cuda_graphs(config, "d2moe")
    assert config.cudagraph_mode == CUDAGraphMode.NONE
    assert "CUDA graphs off" in caplog.text


# --- the MoE runner of a d2moe layer calls its body directly, on every platform ---

_RUNNER_PROBE = r'''
import json, sys
from unittest import mock


def probe(model):
    """For each MoE runner: what _select_forward picks where vLLM would hide the layer in its op."""
    from vllm.model_executor.layers.fused_moe.runner import moe_runner
    from vllm.platforms import current_platform

    picked = []
    for module in model.modules():
        if isinstance(module, moe_runner.MoERunner):
            with mock.patch.object(type(current_platform), "is_cpu", lambda self: False):
                entry = module._select_forward()
            picked.append("direct" if entry is moe_runner._moe_forward else str(entry))
    return picked


if __name__ == "__main__":
    from vllm_d2moe.vllm_glue.llm import start_llm

    llm = start_llm(sys.argv[1], enforce_eager=True, max_model_len=128, distributed_executor_backend="uni")
    print("PICKED", json.dumps(llm.apply_model(probe)[0]))
'''


@pytest.mark.slow
def test_moe_runner_of_a_d2moe_layer_calls_the_layer_body(model_zoo, tmp_path):
    """On GPUs vLLM's runner would call the opaque ``vllm::moe_forward``; the patch makes a d2moe
    layer's runner call its body (so torch.compile sees ``d2moe::moe_experts``) and leaves other
    models' runners alone. The GPU platform's choice is simulated on a real engine's runners."""
    import json

    script = tmp_path / "probe.py"
    script.write_text(_RUNNER_PROBE)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    picked = {}
    for kind in ("d2moe", "hf"):
        proc = subprocess.run([sys.executable, str(script), str(model_zoo["mixtral"][kind])], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        picked[kind] = json.loads(proc.stdout.split("PICKED", 1)[1])
    assert picked["d2moe"] and set(picked["d2moe"]) == {"direct"}
    assert picked["hf"] and "direct" not in picked["hf"] and "moe_forward" in picked["hf"][0]


@pytest.mark.slow
def test_d2moe_models_run_on_the_v1_model_runner(model_zoo, monkeypatch, caplog):
    """vLLM picks Model Runner V2 on GPUs with Triton; the step patches wrap V1's runner, so a d2moe
    model stays on V1 even when V2 is asked for (with a warning), and other models are left alone."""
    from vllm.engine.arg_utils import EngineArgs

    patches.apply()
    configs = {
        kind: EngineArgs(model=str(model_zoo["mixtral"][kind]), max_model_len=128).create_engine_config()
        for kind in ("d2moe", "hf")
    }
    assert configs["d2moe"].model_config.quantization == "d2moe"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    monkeypatch.setattr(patches, "_warned_v2", [])
    with caplog.at_level(logging.WARNING, logger=patches.__name__):
        assert configs["d2moe"].use_v2_model_runner is False
    assert "VLLM_USE_V2_MODEL_RUNNER=1 is ignored" in caplog.text
    assert configs["hf"].use_v2_model_runner is True
