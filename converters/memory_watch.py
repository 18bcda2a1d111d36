"""Peak resident memory of a process, split into anonymous and file-backed pages.

Memory-mapped source weights count in a process's RSS while they are mapped, but
they are file-backed and the kernel can drop them at will; what a conversion really
costs is its anonymous memory. ``/proc/PID/smaps_rollup`` gives both.
"""

import threading
from pathlib import Path


def resident_bytes(pid: int | str = "self") -> tuple[int, int]:
    """``(anonymous, file-backed)`` resident bytes of process ``pid``."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024  # kB
    anonymous = fields.get("Anonymous", 0)
    return anonymous, fields.get("Rss", 0) - anonymous


class PeakMemory:
    """``with PeakMemory(pid) as peak: ...``: samples every ``interval`` seconds in a
    thread; ``peak.anonymous`` / ``peak.file_backed`` are the largest values seen."""

    def __init__(self, pid: int | str = "self", interval: float = 0.02):
        self.pid = pid
        self.interval = interval
        self.anonymous = self.file_backed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        try:
            anonymous, file_backed = resident_bytes(self.pid)
        except (OSError, ValueError):  # the process ended
            return
        self.anonymous = max(self.anonymous, anonymous)
        self.file_backed = max(self.file_backed, file_backed)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "PeakMemory":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
