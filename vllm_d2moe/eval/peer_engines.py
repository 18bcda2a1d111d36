"""The engines compared with this project from outside it (``benchmarks/peers.py``): whether one is
installed, and how to install it when it is not."""

import importlib.util
from importlib.metadata import version

PEERS_HINT = 'pip install -e ".[peers]" (or scripts/install.sh peers; builds llama.cpp from source, ~6 min)'


def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python version, or None with a message saying how to install it."""
    if importlib.util.find_spec("llama_cpp") is None:
        print(f"peers: llama.cpp skipped: llama-cpp-python is not installed; {PEERS_HINT}", flush=True)
        return None
    return version("llama-cpp-python")
