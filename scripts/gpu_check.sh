#!/usr/bin/env bash
# The GPU check of vllm-d2moe, for a CUDA machine (written for one H200), under one time limit:
#
#   1. the environment: GPU, Python, torch; vLLM 0.32.0 for CUDA, used when installed,
#      else `pip install vllm==0.32.0` (needs PyPI; GPU_CHECK_INSTALL_VLLM=0 skips that);
#   2. this repo built as a wheel and installed non-editable (--no-deps); everything after
#      runs with PYTHONSAFEPATH=1, so the installed plugin is what is tested, not the tree;
#   3. the gpu-marked tests that need no engine (Triton kernel vs the float64 reference on
#      CUDA, the op between CUDA-graph pieces, vLLM's graph settings for a d2moe model) and
#      the Triton cases of tests/test_kernels.py on CUDA;
#   4. served completions of the embedded model: eager, CUDA graphs, CUDA graphs under a
#      memory budget (scripts/gpu_served.py);
#   5. the GPU kernel benchmark (benchmarks/kernels_gpu.py);
#   6. the gpu-marked serving tests (three engines on the tiny Mixtral).
#
#   bash scripts/gpu_check.sh            # outputs under $OUT if set, else ./gpu_check_out
#   GPU_CHECK_SECONDS=480 (overall limit; about 570 lets every step run when vLLM is installed),
#   PYTHON=python3, GPU_CHECK_INSTALL_VLLM=1
#
# Steps run in that order while time is left (each under `timeout`, killed at the overall
# limit); each one's log is OUT/NN-name.log, the verdicts OUT/summary.txt. Exit status: 0 when
# every step that ran passed, 1 when one failed, 2 when there is no CUDA device (then the
# gpu-marked tests are only collected and shown skipped, nothing else runs).
set -u -o pipefail

LIMIT=${GPU_CHECK_SECONDS:-480}
START=$SECONDS
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/gpu_check_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
FAILED=0

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((LIMIT - (SECONDS - START))); }

# step NAME LEAST MAX COMMAND...: run COMMAND with at most MAX seconds and what is left of the
# limit (less a margin to write the summary); skipped when less than LEAST seconds are left (a
# step that could not finish is not started, rather than reported as a failure).
step() {
    local name=$1 least=$2 max=$3 budget log rc began
    shift 3
    budget=$(left)
    budget=$((budget - 10))
    ((budget > max)) && budget=$max
    log=$OUT/$name.log
    if ((budget < least)); then
        say "$name: SKIPPED (time limit: $(left) s left, needs about $least)"
        return 0
    fi
    began=$SECONDS
    echo "== $name (up to ${budget} s): $*" >&2
    timeout --kill-after=15 "$budget" "$@" >"$log" 2>&1
    rc=$?
    if ((rc == 0)); then
        say "$name: PASSED ($((SECONDS - began)) s)"
    elif ((rc == 124 || rc == 137)); then
        say "$name: FAILED (timed out after $((SECONDS - began)) s; log $log)"
        FAILED=1
    else
        say "$name: FAILED (exit $rc after $((SECONDS - began)) s; log $log)"
        tail -n 15 "$log" | sed 's/^/    /' | tee -a "$SUMMARY" >&2
        FAILED=1
    fi
    return $rc
}

cd "$REPO" || exit 1
say "vllm-d2moe GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), limit ${LIMIT} s, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# --- 1. environment -----------------------------------------------------------------------
{
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" -c 'import sys, platform; print("python", sys.version.split()[0], platform.machine())'
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1
} >"$OUT/00-environment.log" 2>&1
sed 's/^/  /' "$OUT/00-environment.log" | tee -a "$SUMMARY"

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    say "no CUDA device (or no CUDA torch): the GPU check does not run here"
    # What a CPU machine can show: the gpu-marked tests exist and skip.
    "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu.py >"$OUT/01-cpu-skip.log" 2>&1
    tail -n 3 "$OUT/01-cpu-skip.log" | sed 's/^/  /' | tee -a "$SUMMARY"
    exit 2
fi

vllm_state=$("$PY" -c '
import torch, vllm
print(vllm.__version__, "cuda" if torch.version.cuda else "cpu")' 2>/dev/null | tail -n 1)
case "$vllm_state" in
    "0.32.0"*" cuda") say "vllm: $vllm_state, preinstalled" ;;
    *)
        say "vllm: '${vllm_state:-not importable}' is not vLLM 0.32.0 for CUDA"
        if [[ ${GPU_CHECK_INSTALL_VLLM:-1} == 1 ]]; then
            step 01-install-vllm 60 300 "$PY" -m pip install --quiet "vllm==0.32.0" pytest || true
            vllm_state=$("$PY" -c 'import torch, vllm; print(vllm.__version__, "cuda" if torch.version.cuda else "cpu")' 2>/dev/null | tail -n 1)
            say "vllm after install: '${vllm_state:-not importable}'"
        fi
        ;;
esac
"$PY" -c 'import pytest' 2>/dev/null || "$PY" -m pip install --quiet pytest >"$OUT/01-install-pytest.log" 2>&1

# --- 2. this repo as an installed wheel ---------------------------------------------------
install_wheel() {
    rm -rf "$OUT/wheel"
    "$PY" -m pip wheel --no-deps --no-build-isolation -w "$OUT/wheel" "$REPO" ||
        "$PY" -m pip wheel --no-deps -w "$OUT/wheel" "$REPO" || return 1
    "$PY" -m pip install --no-deps --force-reinstall "$OUT"/wheel/vllm_d2moe-*.whl || return 1
    # Imported from outside the tree: the installed copy, with its vLLM entry point.
    (cd / && PYTHONSAFEPATH=1 "$PY" -c '
import importlib.metadata as md, vllm_d2moe
print("vllm_d2moe", vllm_d2moe.__version__, "from", vllm_d2moe.__file__)
assert "site-packages" in vllm_d2moe.__file__ or "dist-packages" in vllm_d2moe.__file__, vllm_d2moe.__file__
assert any(e.value == "vllm_d2moe:register" for e in md.entry_points(group="vllm.general_plugins"))')
}
export -f install_wheel
export OUT PY REPO
step 02-install-wheel 30 120 bash -c install_wheel || { say "no installed plugin: stopping"; exit 1; }
export PYTHONSAFEPATH=1 TOKENIZERS_PARALLELISM=false
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs)

# --- 3. kernel and CUDA-graph tests -------------------------------------------------------
step 03-gpu-tests 60 150 "${PYTEST[@]}" --junitxml="$OUT/03-gpu-tests.xml" -m gpu -k "not served" \
    tests/test_gpu.py
step 04-triton-kernel-tests 40 120 "${PYTEST[@]}" --junitxml="$OUT/04-triton-kernel-tests.xml" \
    -k triton_mwq tests/test_kernels.py

# --- 4. served completions, with and without a budget ---------------------------------------
step 05-served 200 300 "$PY" scripts/gpu_served.py "$OUT/served"
[[ -f $OUT/served/served.json ]] && cp "$OUT/served/served.json" "$OUT/served.json"

# --- 5. kernel benchmark ------------------------------------------------------------------
# Without PYTHONSAFEPATH: the benchmark imports benchmarks/kernels.py, beside it (the plugin
# still comes from the installed wheel: the repo root is not on the path of a script).
step 06-kernel-benchmark 30 90 env -u PYTHONSAFEPATH "$PY" benchmarks/kernels_gpu.py --out "$OUT"

# --- 6. serving tests ---------------------------------------------------------------------
step 07-gpu-serving-tests 200 300 "${PYTEST[@]}" --junitxml="$OUT/07-gpu-serving-tests.xml" -m gpu -k served \
    tests/test_gpu.py

rm -rf "$OUT/wheel" "$OUT/served/reference-d2moe"  # large, and rebuilt by the next run
say "done in $((SECONDS - START)) s: $([[ $FAILED == 0 ]] && echo 'every step that ran passed' || echo 'some step FAILED')"
exit $FAILED
