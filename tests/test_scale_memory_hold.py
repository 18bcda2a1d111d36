"""``benchmarks/scale.py``'s "device with only B bytes free" helper: it takes memory until only B stays
available, holds it, and gives it back when the benchmark closes its stdin or dies (SIGKILL included).

Run as the benchmark runs it (``scale.py --hold-memory B``), holding about 256 MiB so the shared
machine is not squeezed.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SCALE = Path(__file__).resolve().parent.parent / "benchmarks" / "scale.py"
CHUNK = 256 * 2**20  # the helper's allocation step


def available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable")


def gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_holds_memory_until_stdin_closes():
    leave = available() - 3 * CHUNK
    helper = subprocess.Popen(
        [sys.executable, str(SCALE), "--hold-memory", str(leave)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        words = helper.stdout.readline().split()
        assert words[0] == "HELD"
        held, locked, _ = map(int, words[1:])
        # Other processes take and free memory meanwhile: at least one step of the three asked.
        assert held >= CHUNK
        # mlock'd entirely, or (without CAP_IPC_LOCK) touched only.
        assert locked in (0, held)
        with open(f"/proc/{helper.pid}/status") as f:
            rss = next(
                int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")
            )
        assert rss >= held  # resident, not lazily mapped
    finally:
        helper.stdin.close()
    assert helper.wait(timeout=30) == 0


def test_helper_dies_with_the_benchmark():
    leave = available() - 3 * CHUNK
    parent_code = (
        "import subprocess, sys, time\n"
        f"h = subprocess.Popen([sys.executable, {str(SCALE)!r}, '--hold-memory', '{leave}'],"
        " stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)\n"
        "print(h.pid, h.stdout.readline().split()[0], flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True
    )
    try:
        pid, state = parent.stdout.readline().split()
        assert state == "HELD"
        parent.send_signal(signal.SIGKILL)  # no cleanup runs in the parent
        assert gone(int(pid)), "the memory helper outlived its parent"
    finally:
        parent.kill()
        parent.wait()
