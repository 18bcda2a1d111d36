"""Read errors and delays injected into the expert store, for fault-injection tests and soak runs.

Off unless the environment variable ``D2MOE_INJECT_READ_FAULTS`` names a JSON file when a store is
made (a served engine's store inherits the server's environment). The file is read again whenever
it changes (write it whole: a new file renamed over it), so that a harness can switch faults on
and off while a server runs::

    {"delay_s": 0.02, "fail": [[layer, expert], ...]}

``delay_s`` delays every read attempt; each read of an expert listed in ``fail`` raises a
:class:`CheckpointError` naming it, as a disk error would (the store retries it, then gives up).
A missing file or one that is not such JSON injects nothing.
"""

import json
import os
import threading
import time

from vllm_d2moe.mwq.checkpoint import CheckpointError

ENV_VARIABLE = "D2MOE_INJECT_READ_FAULTS"


class InjectedFaults:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._stamp = None  # (mtime_ns, size) of the file last read
        self._delay_s, self._fail = 0.0, frozenset()

    @classmethod
    def from_environment(cls) -> "InjectedFaults | None":
        path = os.environ.get(ENV_VARIABLE)
        return cls(path) if path else None

    def _current(self) -> tuple[float, frozenset]:
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    with open(self.path) as f:
                        spec = json.load(f)
                    self._delay_s = float(spec.get("delay_s", 0.0))
                    self._fail = frozenset((int(layer), int(expert)) for layer, expert in spec.get("fail", ()))
                except (OSError, ValueError, TypeError, AttributeError):
                    self._delay_s, self._fail = 0.0, frozenset()
            return self._delay_s, self._fail

    def before_read(self, layer: int, expert: int) -> None:
        """Sleep the injected delay; raise the injected error if ``(layer, expert)`` is to fail."""
        delay_s, fail = self._current()
        if delay_s > 0:
            time.sleep(delay_s)
        if (layer, expert) in fail:
            raise CheckpointError(f"injected read error ({ENV_VARIABLE}={self.path}) of layer {layer} expert {expert}")
