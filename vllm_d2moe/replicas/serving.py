"""``d2moe ray-serve``: N OpenAI servers (``d2moe serve``) as Ray actors behind one port.

Each replica actor starts ``d2moe serve`` on its own free loopback port, as
its child process, and the command then serves :mod:`front`'s load balancer on
``--host``/``--port`` until interrupted. A replica that fails to start is
left out (its log's tail is printed); at the end every replica is stopped and
the Ray cluster this command started is shut down.

Why not Ray Serve: it runs here (a trivial two-replica app answered 23 s after
start), but adds a controller and an HTTP proxy actor (about 220 MB each) and
would still need vLLM's OpenAI routes re-exposed; vLLM's own server per replica
behind a small front keeps exactly ``d2moe serve``'s API.
"""

import ctypes
import logging
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from vllm_d2moe.replicas.cluster import failure_reason, import_ray, local_cluster
from vllm_d2moe.replicas.spec import ReplicaSpec, add_replica_arguments, specs_from_args

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded before any fork: the child only calls it


def _terminate_with_parent() -> None:
    """In the child before exec: get SIGTERM when the actor process dies (e.g. ``ray.kill``)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerReplica:
    """One ``d2moe serve`` process on a loopback port, a child of this Ray actor."""

    def __init__(self, spec: ReplicaSpec, log_path: str, server_args: list[str]):
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log_path = log_path
        port = self.url.rsplit(":", 1)[1]
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vllm_d2moe.cli",
                    "serve",
                    *spec.serve_args(),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    port,
                    *server_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_terminate_with_parent,  # noqa: PLW1509
            )

    def wait_ready(self, timeout_s: float) -> str:
        """The server's URL once ``/health`` answers; raises with the log's tail if it exits."""
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return self.url
            except OSError as e:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"not healthy after {timeout_s:.0f} s; log: {self.log_path}") from e
                time.sleep(1)
        tail = Path(self.log_path).read_text()[-2000:]
        raise RuntimeError(f"the server exited with code {self.proc.returncode}:\n{tail}")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_replicas(
    specs: list[ReplicaSpec], log_dir: Path, server_args: list[str], timeout_s: float
) -> tuple[list, list[str], dict[int, str]]:
    """Start every replica at once; ``(actors, URLs of the ready ones, failures by replica)``."""
    ray = import_ray()
    actor = ray.remote(num_cpus=1)(ServerReplica)
    actors = [
        actor.options(runtime_env=s.runtime_env()).remote(s, str(log_dir / f"replica-{i}.log"), server_args)
        for i, s in enumerate(specs)
    ]
    urls, failures = [], {}
    for i, (a, ready) in enumerate([(a, a.wait_ready.remote(timeout_s)) for a in actors]):
        try:
            urls.append(ray.get(ready))
        except ray.exceptions.RayError as e:
            failures[i] = failure_reason(e)
            logger.warning("replica %d failed to start: %s", i, failures[i])
            ray.kill(a)
    return actors, urls, failures


def stop_replicas(actors: list) -> None:
    ray = import_ray()
    for a in actors:
        try:
            ray.get(a.stop.remote(), timeout=60)
        except ray.exceptions.RayError:
            pass  # already gone (failed at start or killed): its server got SIGTERM with it
        ray.kill(a)


def add_arguments(parser) -> None:
    add_replica_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address of the front (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port of the front (default 8000)")
    parser.add_argument(
        "--server-args",
        default="",
        help='more `d2moe serve` arguments for every replica, as one string (e.g. "--chat-template t.jinja")',
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="where each replica's server log goes (default: a new temporary folder)",
    )
    parser.add_argument(
        "--start-timeout", type=float, default=600, help="seconds a replica may take to start"
    )
    parser.add_argument("--show-replica-logs", action="store_true", help="print Ray's actor logs")


def run(args) -> int:
    from vllm_d2moe.replicas.front import run_front

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        specs = specs_from_args(args)
    except ValueError as e:
        print(f"d2moe ray-serve: error: {e}", file=sys.stderr)
        return 2
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="d2moe-ray-serve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    with local_cluster(len(specs), args.show_replica_logs):
        actors, urls, failures = start_replicas(
            specs, log_dir, shlex.split(args.server_args), args.start_timeout
        )
        try:
            if not urls:
                print(f"d2moe ray-serve: error: no replica started (logs in {log_dir})", file=sys.stderr)
                return 1
            left_out = f"; left out: {failures}" if failures else ""
            print(
                f"{len(urls)} of {len(specs)} replicas ready ({', '.join(urls)}; "
                f"logs in {log_dir}{left_out}); serving on http://{args.host}:{args.port}",
                file=sys.stderr,
                flush=True,
            )
            run_front(urls, args.host, args.port)
        finally:
            stop_replicas(actors)
    return 0
