"""Ctrl-C/SIGTERM as a stop request a training loop polls (both trainers resume from their checkpoint)."""

import signal
import threading
from contextlib import contextmanager


@contextmanager
def stop_on_signal():
    """Turn the first Ctrl-C/SIGTERM into a stop request the loop polls between steps.

    Stopping between steps guarantees the checkpoint never holds a half-applied
    optimizer update.  A second Ctrl-C raises KeyboardInterrupt as usual.
    """
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested  # signal handlers can only be installed from the main thread
        return

    def request_stop(signum, frame):
        requested.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
