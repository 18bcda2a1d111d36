"""Plugin registration: cheap to import, idempotent, visible to vLLM through its entry point."""

import importlib.metadata
import os
import subprocess
import sys

import pytest


def test_import_pulls_in_nothing_heavy():
    code = (
        "import sys, vllm_d2moe, vllm_d2moe.cli; "
        "heavy = [m for m in ('torch', 'vllm', 'transformers', 'triton') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_entry_point_is_installed():
    plugins = {e.name: e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("d2moe") == "vllm_d2moe:register"


def test_register_is_idempotent_and_adds_the_method():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    import vllm_d2moe

    vllm_d2moe.register()
    vllm_d2moe.register()
    assert QUANTIZATION_METHODS.count("d2moe") == 1
    config_class = get_quantization_config("d2moe")
    assert config_class.get_name() == "d2moe"
    assert config_class.from_config({"quant_method": "d2moe", "bits": 4}).requested_bits == 4
    assert config_class().requested_bits is None  # `--quantization d2moe` with no checkpoint config
    with pytest.raises(ValueError, match=r"unknown d2moe quantization_config option\(s\) \['bitz'\]"):
        config_class.from_config({"quant_method": "d2moe", "bitz": 4})
    with pytest.raises(ValueError, match="must be an integer in"):
        config_class.from_config({"bits": 0})


def test_not_a_d2moe_checkpoint_is_a_clear_error(tmp_path):
    from vllm_d2moe.vllm_glue.quant_config import D2MoEConfig

    with pytest.raises(RuntimeError, match="is not a d2moe checkpoint.*d2moe convert"):
        D2MoEConfig().maybe_update_config(str(tmp_path))


def test_cli_lists_its_subcommands():
    proc = subprocess.run([sys.executable, "-m", "vllm_d2moe.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("convert", "inspect", "serve", "demo", "train-reference"):
        assert command in proc.stdout


def test_registration_says_once_that_it_bounds_onednns_primitive_cache():
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    code = ("import os, vllm_d2moe; vllm_d2moe.register(); vllm_d2moe.register(); "
            "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "128", proc.stderr[-3000:]
    # On stderr: in the API server vLLM configures its logging only after plugins are registered.
    assert proc.stderr.count("d2moe: ONEDNN_PRIMITIVE_CACHE_CAPACITY=128 for this process") == 1
