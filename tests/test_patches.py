"""vllm_glue/patches.py: the version guard, applying each patch once, and the CUDA-graph
settings a d2moe model gets (expert_op.keep_out_of_cuda_graphs, on vLLM's real config class)."""

import logging
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
    wrapped = {p.name: getattr(p.resolve(), p.method) for p in patches.PATCHES}
    assert patches.apply() == []
    for patch in patches.PATCHES:
        method = getattr(patch.resolve(), patch.method)
        assert patches.is_applied(patch) and method is wrapped[patch.name], patch.name
        # One layer of wrapping over vLLM's own method.
        assert not hasattr(method.__wrapped__, "_d2moe_patch"), patch.name
        assert patch.why and "\n" not in patch.why
    assert len({p.name for p in patches.PATCHES}) == len(patches.PATCHES)


def _register_under(version: str, allow: bool) -> subprocess.CompletedProcess:
    """``register()`` in a fresh process whose vLLM reports ``version`` (patches are per process)."""
    code = (
        "import vllm; vllm.__version__ = %r\n"
        "import vllm_d2moe\n"
        "from vllm_d2moe.vllm_glue import patches\n"
        "vllm_d2moe.register()\n"
        "print('registered', all(patches.is_applied(p) for p in patches.PATCHES))\n"
    ) % version
    env = {k: v for k, v in __import__("os").environ.items() if k != patches.ALLOW_UNTESTED_ENV}
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
    config = _compilation_config(CUDAGraphMode.NONE)  # CPU, or enforce_eager
    keep_out_of_cuda_graphs(config, "d2moe")
    assert config.cudagraph_mode == CUDAGraphMode.NONE and OP_NAME not in config.splitting_ops


def test_full_graphs_without_piecewise_splitting_are_turned_off(caplog):
    from vllm.config import CUDAGraphMode

    from vllm_d2moe.vllm_glue.expert_op import keep_out_of_cuda_graphs

    config = _compilation_config(CUDAGraphMode.FULL, splitting_ops=[])  # a user's "one full graph"
    with caplog.at_level(logging.WARNING, logger="vllm_d2moe.vllm_glue.expert_op"):
        keep_out_of_cuda_graphs(config, "d2moe")
    assert config.cudagraph_mode == CUDAGraphMode.NONE
    assert "CUDA graphs off" in caplog.text
