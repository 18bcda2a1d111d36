"""The local Ray cluster a command starts for its replicas, and stops again; Ray errors in one line."""

import contextlib
import logging

# Replicas exchange only prompts and token ids: a small object store is plenty
# (Ray's default reserves 30% of memory).
OBJECT_STORE_BYTES = 256 << 20


def import_ray():
    """``ray``, or an error that says how to install it (it is an optional extra)."""
    try:
        import ray
    except ImportError:
        raise SystemExit(
            "Ray is not installed: pip install 'vllm-d2moe[ray]' (or: bash scripts/install.sh ray)"
        ) from None
    return ray


def failure_reason(error: Exception) -> str:
    """The exception line(s) under the last traceback frame of a Ray error, on one line."""
    lines = str(error).splitlines()
    frames = [i for i, line in enumerate(lines) if line.lstrip().startswith('File "')]
    rest = lines[frames[-1] + 1 :] if frames else lines
    while rest and rest[0].startswith("    "):  # the frame's source line and its ^^^ markers
        rest = rest[1:]
    return " ".join(line.strip() for line in rest if line.strip())[:500] or type(error).__name__


@contextlib.contextmanager
def local_cluster(num_cpus: int, show_replica_logs: bool = True):
    """A new single-node Ray cluster with ``num_cpus`` logical CPUs (one per replica).

    ``address="local"`` always starts a fresh cluster rather than joining one
    that happens to run on this machine, so ``ray.shutdown()`` at the end stops
    exactly the processes this command started, nothing else. Replica logs stay
    in Ray's session folder unless ``show_replica_logs``.
    """
    ray = import_ray()
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=OBJECT_STORE_BYTES,
        logging_level=logging.WARNING,
        log_to_driver=show_replica_logs,
    )
    try:
        yield
    finally:
        ray.shutdown()
