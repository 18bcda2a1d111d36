"""vLLM's CPU runtime set up: the libraries its CPU backend asks to have preloaded, found on this
machine and preloaded into ``d2moe serve`` / ``d2moe demo`` by re-executing the command once with
``LD_PRELOAD`` naming them; on small machines the model worker given every CPU
(:func:`share_reserved_cpus`, also for those two commands); and oneDNN's primitive cache bounded
(:func:`bound_onednn_primitive_cache`, applied by the plugin's registration in every process).

vLLM's CPU worker warns at every start that ``libtcmalloc`` and ``libiomp`` (Intel OpenMP) are not
in ``LD_PRELOAD``; it only reads the variable, and a library can only be preloaded by the dynamic
loader when a process starts, hence the re-exec (before vLLM or torch is imported). On a 2-core
AVX2 VM neither measurably changed decode speed (``benchmarks/results/cpu_setup.md``); both are
preloaded as vLLM recommends. The command prints one line saying what it set and why;
``D2MOE_NO_PRELOAD=1`` starts it unchanged. ``scripts/install.sh`` installs the libraries.
"""

import importlib.metadata
import os
import sys
import sysconfig
from pathlib import Path

OPT_OUT_ENV = "D2MOE_NO_PRELOAD"
# Set in the re-executed process, so that it never re-executes again (whatever it then finds).
REEXECUTED_ENV = "D2MOE_PRELOAD_DONE"

# oneDNN keeps every primitive it creates in a process-wide cache, 1024 of them by default, each
# holding memory that grows with its shapes. vLLM's CPU linear layers (``onednn_mm``) create one per
# distinct batch token count, so a long-running server's memory grows with every new batch size:
# +123 MiB of live allocations in one minute of failing requests in the soak's worker (issue 17).
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
# Above the 64 decode batch sizes a 64-client server cycles through (vLLM's own cache per layer
# holds 32); at 0 such cycling made each call ~15% slower.
ONEDNN_CACHE_CAPACITY = 128


def bound_onednn_primitive_cache(environ=os.environ) -> bool:
    """Set ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` to :data:`ONEDNN_CACHE_CAPACITY` unless it is set
    (a user's own value wins) and say so on stderr; True when it set it. oneDNN reads it when it makes its first
    primitive, so setting it at plugin registration reaches this process and those it starts."""
    if ONEDNN_CACHE_ENV in environ:
        return False
    environ[ONEDNN_CACHE_ENV] = str(ONEDNN_CACHE_CAPACITY)
    # Printed: in the API server vLLM configures its logging only after plugins are registered.
    print(f"d2moe: {ONEDNN_CACHE_ENV}={ONEDNN_CACHE_CAPACITY} for this process and those it starts (oneDNN's "
          "default of 1024 cached primitives grows a server's memory with every new batch size; set it to "
          "choose another)", file=sys.stderr, flush=True)
    return True


# vLLM's default thread binding (``VLLM_CPU_OMP_THREADS_BIND=auto``) keeps one CPU per local rank
# away from the model worker for the engine-core process. At this many usable CPUs or fewer, that
# is a quarter of the compute or more, while the engine core only schedules between the worker's
# steps: on 2 CPUs the reservation decoded 1.5-2.0x slower (benchmarks/results/cpu_setup.md).
SMALL_MACHINE_CPUS = 4
RESERVED_CPUS_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
THREADS_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def reserved_cpus_to_share(environ=os.environ, usable_cpus: int | None = None) -> dict[str, str]:
    """``{"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}`` on a machine with at most :data:`SMALL_MACHINE_CPUS`
    usable CPUs (``usable_cpus``, default this process's affinity) when ``environ`` holds neither a
    user's own reservation nor an explicit binding (anything but ``auto``); else nothing."""
    if RESERVED_CPUS_ENV in environ or environ.get(THREADS_BIND_ENV, "auto") != "auto":
        return {}
    usable_cpus = len(os.sched_getaffinity(0)) if usable_cpus is None else usable_cpus
    return {RESERVED_CPUS_ENV: "0"} if usable_cpus <= SMALL_MACHINE_CPUS else {}


def share_reserved_cpus(environ=os.environ, usable_cpus: int | None = None) -> bool:
    """Set :func:`reserved_cpus_to_share` in ``environ``, so that vLLM's automatic binding gives the
    model worker every CPU, and say so on stderr; True when it set it. vLLM reads the variable when
    it starts its workers, in processes started after this one, so setting it before the engine
    starts is enough."""
    usable_cpus = len(os.sched_getaffinity(0)) if usable_cpus is None else usable_cpus
    setting = reserved_cpus_to_share(environ, usable_cpus)
    if not setting:
        return False
    environ.update(setting)
    print(f"d2moe: {RESERVED_CPUS_ENV}=0: the model worker gets all {usable_cpus} CPUs (vLLM reserves one "
          f"per rank for its engine-core process, which on {SMALL_MACHINE_CPUS} CPUs or fewer costs more "
          f"than it saves; set {RESERVED_CPUS_ENV} to choose, and expect vLLM's warning about it)",
          file=sys.stderr, flush=True)
    return True


def _system_library_dirs() -> list[Path]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [Path(sys.prefix) / "lib", Path("/usr/local/lib"), Path("/usr/lib") / multiarch, Path("/usr/lib64"),
            Path("/usr/lib")]
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def _first_file(patterns: list[str]) -> Path | None:
    for directory in _system_library_dirs():
        for pattern in patterns:
            for path in sorted(directory.glob(pattern)):
                if path.is_file() and "_debug" not in path.name:
                    return path
    return None


def tcmalloc_library() -> Path | None:
    """gperftools' tcmalloc (Debian ``libtcmalloc-minimal4``, or the full one of ``libgoogle-perftools4``)."""
    return _first_file(["libtcmalloc_minimal.so*", "libtcmalloc.so*"])


def intel_openmp_library() -> Path | None:
    """Intel OpenMP's ``libiomp5.so`` (PyPI ``intel-openmp``, which installs it under the environment's lib/)."""
    try:
        files = importlib.metadata.distribution("intel-openmp").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == "libiomp5.so" and Path(file.locate()).is_file():
            return Path(file.locate()).resolve()
    return _first_file(["libiomp5.so"])


# The name vLLM looks for in LD_PRELOAD -> (how to find the library, why it is preloaded).
LIBRARIES = {
    "libtcmalloc": (tcmalloc_library, "vLLM's CPU backend asks for it"),
    "libiomp": (intel_openmp_library, "vLLM's CPU backend asks for it"),
}
# Preloaded when installed: vLLM's recommendation (no measurable gain or cost here: benchmarks/results/cpu_setup.md).
PRELOADED = ("libtcmalloc", "libiomp")


def found_libraries(names=PRELOADED) -> dict[str, Path]:
    """Of the libraries ``names`` (keys of :data:`LIBRARIES`), those installed: name -> file."""
    found = {name: LIBRARIES[name][0]() for name in names}
    return {name: path for name, path in found.items() if path is not None}


def libraries_to_add(environ: dict[str, str], libraries: dict[str, Path]) -> dict[str, Path]:
    """Those of ``libraries`` (name -> file) that exist as files and whose name ``LD_PRELOAD`` in
    ``environ`` does not already hold (a user's own choice of allocator or OpenMP runtime wins)."""
    preload = environ.get("LD_PRELOAD", "")
    return {name: path for name, path in libraries.items() if name not in preload and Path(path).is_file()}


def preload_environment(environ: dict[str, str], libraries: dict[str, Path]) -> dict[str, str]:
    """``environ`` with ``LD_PRELOAD`` led by :func:`libraries_to_add`."""
    added = [str(path) for path in libraries_to_add(environ, libraries).values()]
    return {**environ, "LD_PRELOAD": ":".join([*added, *filter(None, environ.get("LD_PRELOAD", "").split(":"))])}


def reexec_with_preload(args: list[str], libraries: dict[str, Path] | None = None) -> None:
    """Replace this process with ``python ARGS`` under :func:`preload_environment` (``libraries``:
    default the installed ones of :data:`PRELOADED`), printing one line that says what was set and
    why; return without doing anything when there is nothing to add, when ``D2MOE_NO_PRELOAD``
    is set, or in a process this function started."""
    if os.environ.get(OPT_OUT_ENV, "") not in ("", "0") or REEXECUTED_ENV in os.environ:
        return
    libraries = found_libraries() if libraries is None else libraries
    added = libraries_to_add(dict(os.environ), libraries)
    if not added:
        return
    env = preload_environment(dict(os.environ), added)
    reasons = "; ".join(f"{name}: {LIBRARIES[name][1]}" if name in LIBRARIES else name for name in added)
    print(f"d2moe: starting again with LD_PRELOAD={env['LD_PRELOAD']} ({reasons}; "
          f"{OPT_OUT_ENV}=1 to start without)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *args], {**env, REEXECUTED_ENV: "1"})
