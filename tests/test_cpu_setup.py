"""vllm_d2moe.cpu_setup: the libraries found, LD_PRELOAD built from existing files only, the re-exec
(once, never with the opt-out), and ``d2moe demo`` / ``d2moe serve`` running under it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_d2moe import cpu_setup

REPO = Path(__file__).resolve().parent.parent
REEXEC_LINE = "d2moe: starting again with LD_PRELOAD="


def loaded_libm() -> Path:
    """libm as this very process mapped it: a real library, harmless to preload, on any Linux."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        if "/libm.so" in line or "/libm-" in line:
            return Path(line.split()[-1])
    raise AssertionError("libm is not mapped in this process")


def run_python(code: str, env_changes: dict[str, str | None]) -> subprocess.CompletedProcess:
    ours = (cpu_setup.REEXECUTED_ENV, cpu_setup.OPT_OUT_ENV, cpu_setup.RESERVED_CPUS_ENV, cpu_setup.THREADS_BIND_ENV)
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env.pop("LD_PRELOAD", None)
    env |= {k: v for k, v in env_changes.items() if v is not None}
    return subprocess.run([sys.executable, *code], capture_output=True, text=True, env=env, timeout=120, check=True)


def test_found_libraries_are_existing_files_under_their_own_names():
    found = cpu_setup.found_libraries(list(cpu_setup.LIBRARIES))
    for name, path in found.items():
        assert path.is_file(), (name, path)
        assert path.name.startswith(name), (name, path)  # the name vLLM looks for in LD_PRELOAD
    assert set(cpu_setup.found_libraries(["libtcmalloc"])) <= {"libtcmalloc"}


def test_ld_preload_names_only_existing_files_and_keeps_the_users_own(tmp_path):
    real = tmp_path / "libtcmalloc_minimal.so.4"
    real.write_bytes(b"")
    libraries = {"libtcmalloc": real, "libiomp": tmp_path / "libiomp5.so"}  # the second does not exist
    env = cpu_setup.preload_environment({"LD_PRELOAD": "/opt/libmine.so", "HOME": "/h"}, libraries)
    assert env == {"LD_PRELOAD": f"{real}:/opt/libmine.so", "HOME": "/h"}
    assert cpu_setup.libraries_to_add({}, libraries) == {"libtcmalloc": real}
    # A user's own tcmalloc (any file of that name) wins: nothing is added for it.
    assert cpu_setup.libraries_to_add({"LD_PRELOAD": "/x/libtcmalloc.so.4"}, libraries) == {}


REEXEC_SCRIPT = """
import os, sys
from pathlib import Path
from vllm_d2moe import cpu_setup
print("started", flush=True)
cpu_setup.reexec_with_preload(["-c", sys.argv[1], sys.argv[1]], {"libm": Path(%r)})
print("LD_PRELOAD=" + os.environ.get("LD_PRELOAD", ""))
print("mapped=" + str(Path(%r).name in Path("/proc/self/maps").read_text()))
"""


def test_reexec_sets_ld_preload_once_and_says_so():
    libm = loaded_libm()
    script = REEXEC_SCRIPT % (str(libm), str(libm))
    done = run_python(["-c", script, script], {})
    assert done.stdout.splitlines() == ["started", "started", f"LD_PRELOAD={libm}", "mapped=True"]
    lines = [line for line in done.stderr.splitlines() if line.startswith(REEXEC_LINE)]
    assert lines == [f"{REEXEC_LINE}{libm} (libm; {cpu_setup.OPT_OUT_ENV}=1 to start without)"]


def test_reexec_respects_the_opt_out_and_an_existing_preload():
    libm = loaded_libm()
    script = REEXEC_SCRIPT % (str(libm), str(libm))
    opted_out = run_python(["-c", script, script], {cpu_setup.OPT_OUT_ENV: "1"})
    assert opted_out.stdout.splitlines()[:2] == ["started", "LD_PRELOAD="]
    assert REEXEC_LINE not in opted_out.stderr
    already = run_python(["-c", script, script], {"LD_PRELOAD": str(libm)})
    assert already.stdout.splitlines()[:2] == ["started", f"LD_PRELOAD={libm}"]
    assert REEXEC_LINE not in already.stderr


def test_demo_command_runs_under_the_preloaded_libraries_it_names():
    """``d2moe demo`` (``--help``: no engine) from the command line: one line naming exactly the libraries
    installed here, every one an existing file; none with the opt-out."""
    found = cpu_setup.found_libraries()
    done = run_python(["-m", "vllm_d2moe.cli", "demo", "--help"], {})
    assert done.stdout.count("usage: d2moe demo") == 1
    lines = [line for line in done.stderr.splitlines() if line.startswith(REEXEC_LINE)]
    assert len(lines) == (1 if found else 0), done.stderr
    if found:
        preload = lines[0][len(REEXEC_LINE):].split(" ", 1)[0].split(":")
        assert preload == [str(path) for path in found.values()]
    opted_out = run_python(["-m", "vllm_d2moe.cli", "demo", "--help"], {cpu_setup.OPT_OUT_ENV: "1"})
    assert REEXEC_LINE not in opted_out.stderr


def test_serve_and_demo_ask_for_the_cpu_setup_before_anything_imports_vllm_or_torch():
    code = ("import sys; from vllm_d2moe import cpu_setup, demo, serve; "
            "print(demo.CPU_SETUP, serve.CPU_SETUP, 'vllm' in sys.modules, 'torch' in sys.modules)")
    assert run_python(["-c", code], {}).stdout.split() == ["True", "True", "False", "False"]
    from vllm_d2moe.mwq import inspect

    assert not hasattr(inspect, "CPU_SETUP")  # a command that starts no engine is never re-executed


SHARE_LINE = f"d2moe: {cpu_setup.RESERVED_CPUS_ENV}=0"


def test_small_machines_give_the_worker_every_cpu_unless_the_user_chose(capsys):
    """vLLM's automatic binding reserves a CPU per rank for the engine core; on at most
    ``SMALL_MACHINE_CPUS`` the reservation is dropped, once, with a line saying so."""
    reserved, bind = cpu_setup.RESERVED_CPUS_ENV, cpu_setup.THREADS_BIND_ENV
    for cpus in range(1, cpu_setup.SMALL_MACHINE_CPUS + 1):
        for env in ({}, {bind: "auto"}):
            assert cpu_setup.share_reserved_cpus(env, usable_cpus=cpus)
            assert env[reserved] == "0"
            assert capsys.readouterr().err.startswith(f"{SHARE_LINE}: the model worker gets all {cpus} CPUs")
            assert not cpu_setup.share_reserved_cpus(env, usable_cpus=cpus)  # already set: once only
    for env in ({reserved: "1"}, {bind: "0"}, {bind: "nobind"}):
        before = dict(env)
        assert not cpu_setup.share_reserved_cpus(env, usable_cpus=2) and env == before
    env = {}
    assert not cpu_setup.share_reserved_cpus(env, usable_cpus=cpu_setup.SMALL_MACHINE_CPUS + 1) and env == {}
    assert capsys.readouterr().err == ""


def test_demo_command_shares_the_reserved_cpu_on_this_machine():
    """From the command line (``--help``: no engine), before its re-exec, which inherits it."""
    done = run_python(["-m", "vllm_d2moe.cli", "demo", "--help"], {})
    small = len(os.sched_getaffinity(0)) <= cpu_setup.SMALL_MACHINE_CPUS
    assert done.stderr.count(SHARE_LINE) == (1 if small else 0), done.stderr
    chosen = run_python(["-m", "vllm_d2moe.cli", "demo", "--help"], {cpu_setup.RESERVED_CPUS_ENV: "1"})
    assert SHARE_LINE not in chosen.stderr


def test_the_projects_environment_variables_pass_vllms_strict_check(monkeypatch):
    """vLLM warns at every start about a ``VLLM_*`` variable it does not know, and refuses to start
    with one when its check is strict: the project's own variables stay out of that prefix."""
    from vllm.platforms.interface import Platform

    from vllm_d2moe.vllm_glue.patches import ALLOW_UNTESTED_ENV

    for name in (cpu_setup.OPT_OUT_ENV, cpu_setup.REEXECUTED_ENV, ALLOW_UNTESTED_ENV):
        monkeypatch.setenv(name, "1")
    Platform.validate_environ(hard_fail=True)


ONEDNN_PROBE = """
import torch
from vllm import _custom_ops as ops
import vllm_d2moe
vllm_d2moe.register()  # as vLLM calls it: torch and vLLM's kernels already imported
weight, x = torch.randn(64, 64), torch.randn(%d, 64)
handler = ops.create_onednn_mm(weight.t(), 32)
for m in range(1, %d + 1):  # one oneDNN primitive per batch size, as a server's new batches make them
    ops.onednn_mm(handler, x[:m], None)
print("AGAIN", flush=True)
for m in range(1, 41):  # the first batch sizes again
    ops.onednn_mm(handler, x[:m], None)
"""


@pytest.mark.extended  # two engines' worth of imports and 400 primitives: ~70 s
def test_registration_bounds_onednns_primitive_cache_of_vllms_cpu_linear_layers():
    """oneDNN (its verbose log says whether a primitive came from its cache) keeps the first batch
    sizes' primitives among 1024 by default; after registration it keeps only the last
    ``ONEDNN_CACHE_CAPACITY``. A user's own capacity is left as it is."""
    sizes = cpu_setup.ONEDNN_CACHE_CAPACITY + 72

    def again(env):
        done = run_python(["-c", ONEDNN_PROBE % (sizes, sizes)], {"ONEDNN_VERBOSE": "all", **env})
        lines = done.stdout.split("AGAIN", 1)[1].splitlines()
        return {kind: sum(f"primitive,create:{kind}" in line for line in lines) for kind in ("cache_hit", "cache_miss")}

    assert again({}) == {"cache_hit": 0, "cache_miss": 40}
    assert again({cpu_setup.ONEDNN_CACHE_ENV: "1024"}) == {"cache_hit": 40, "cache_miss": 0}
    env = {cpu_setup.ONEDNN_CACHE_ENV: "7"}
    assert not cpu_setup.bound_onednn_primitive_cache(env) and env == {cpu_setup.ONEDNN_CACHE_ENV: "7"}
