"""Building an output directory next to its destination and moving it into place when complete.

The work happens in a hidden sibling of the destination (same file system, so
the final rename is atomic): ``.DST.tmp-XXXXXXXX`` for a one-shot build, which
any failure or interruption removes; or ``.DST.d2moe-partial`` for a resumable
build, which a failure removes but an interruption (Ctrl-C or SIGTERM) keeps
for the next run of the same command to continue. Nothing else ever reads either.
"""

import shutil
import signal
import threading
import uuid
from pathlib import Path

PARTIAL_SUFFIX = "d2moe-partial"


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; raised like Ctrl-C so that the build stops at the next bytecode."""


def partial_path(dst: Path) -> Path:
    """Where a resumable build of ``dst`` keeps its state."""
    return dst.with_name(f".{dst.name}.{PARTIAL_SUFFIX}")


def _sibling(dst: Path, tag: str) -> Path:
    return dst.with_name(f".{dst.name}.{tag}-{uuid.uuid4().hex[:8]}")


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signum}")


class OutputDirectory:
    """``with OutputDirectory(dst, overwrite, resumable) as work:`` write under
    ``work.path``, then ``work.commit()``; leaving the block without committing discards
    the work (kept, if resumable, when the run was interrupted)."""

    def __init__(self, dst: Path, overwrite: bool, resumable: bool):
        self.dst = Path(dst)
        self.overwrite = overwrite
        self.resumable = resumable
        self.path = partial_path(self.dst) if resumable else _sibling(self.dst, "tmp")
        self.resumed = False
        self.committed = False
        self._previous_handler = None

    def __enter__(self) -> "OutputDirectory":
        if self.dst.exists() and not self.overwrite:
            raise FileExistsError(f"{self.dst} already exists; pass --overwrite to replace it")
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.resumed = self.path.is_dir()
        self.path.mkdir(exist_ok=self.resumable)
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
        return self

    def discard(self) -> None:
        """Forget the work done so far (e.g. a partial build for other options)."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()
        self.resumed = False

    def commit(self) -> None:
        if self.dst.exists():
            old = _sibling(self.dst, "old")
            self.dst.rename(old)
            self.path.rename(self.dst)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            self.path.rename(self.dst)
        self.committed = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
        if self.committed:
            return
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        if not (self.resumable and interrupted):
            shutil.rmtree(self.path, ignore_errors=True)
