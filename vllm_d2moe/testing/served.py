"""``d2moe serve`` in a process group of its own, on a free loopback port: started, waited for until
``/health`` answers, and ended whole (a server stopped while its engine core was still starting
leaves that engine running otherwise)."""

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from vllm_d2moe.vllm_glue.llm import ENGINE_ENV


class ServerError(RuntimeError):
    """A server exited or did not become healthy; the message carries its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def terminate_with_parent() -> None:
    """In a child between fork and exec: the kernel sends it SIGTERM when the process that started
    it dies, however it dies (a test worker ended by the OOM killer would otherwise leave its
    servers running, each holding gigabytes). Survives the exec of ``d2moe serve``'s restart. The
    kernel ties it to the starting *thread*: start servers from one that outlives them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def serve_process(args: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """``d2moe serve ARGS`` in vLLM's default process layout (engine core spawned), whatever the
    caller's environment; ``d2moe serve`` makes its own Prometheus directory. The server ends
    (SIGTERM: vLLM's own shutdown, children included) if the caller dies first."""
    base = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return subprocess.Popen(
        [sys.executable, "-m", "vllm_d2moe.cli", "serve", *args],
        env={**base, **ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", **(env or {})},
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=terminate_with_parent,
    )


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left after a minute."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def healthy(base_url: str, timeout: float = 10) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=timeout) as reply:
            return reply.status == 200
    except OSError:
        return False


def log_tail(log_path: Path, chars: int = 3000) -> str:
    return Path(log_path).read_text(errors="replace")[-chars:]


def start_server(model: str, quantization_config: dict, log_path: Path, extra_args: tuple[str, ...] = (),
                 env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """``(process, base URL)`` of ``d2moe serve MODEL --quantization d2moe`` with
    ``quantization_config`` (``quant_method`` added), started; see :func:`wait_healthy`."""
    port = free_port()
    overrides = json.dumps({"quantization_config": {"quant_method": "d2moe", **quantization_config}})
    proc = serve_process([model, "--quantization", "d2moe", "--host", "127.0.0.1", "--port", str(port),
                          "--hf-overrides", overrides, *extra_args], log_path, env)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, base_url: str, log_path: Path, timeout_s: float = 600) -> None:
    """Return once ``/health`` answers; :class:`ServerError` if the server exits or takes longer."""
    deadline = time.monotonic() + timeout_s
    while not healthy(base_url, timeout=2):
        if proc.poll() is not None:
            raise ServerError(f"server exited with {proc.returncode}:\n{log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise ServerError(f"server not healthy after {timeout_s:.0f} s:\n{log_tail(log_path)}")
        time.sleep(1)


@contextlib.contextmanager
def running_server(model: str, quantization_config: dict, log_path: Path, extra_args: tuple[str, ...] = (),
                   env: dict | None = None, start_timeout_s: float = 600):
    """Yield ``(process, base URL)`` of :func:`start_server` once healthy; stopped on exit."""
    proc, base = start_server(model, quantization_config, log_path, extra_args, env)
    try:
        wait_healthy(proc, base, log_path, start_timeout_s)
        yield proc, base
    finally:
        stop(proc)
