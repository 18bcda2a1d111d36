#!/usr/bin/env bash
# A normal (non-editable) install, as a user gets it: build the wheel from the repo's
# files, check it holds every module and data file, install it into a fresh virtual
# environment (the dependencies already installed are reused through the system
# site-packages) and serve the embedded model from outside the repo.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Build from a copy of the tracked and non-ignored files, so nothing left in the
# working tree (build/, egg-info) takes part.
mkdir "$work/src"
(cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - --ignore-failed-read 2>/dev/null) | tar -xf - -C "$work/src"
python -m pip wheel --disable-pip-version-check -q --no-deps -w "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/vllm_d2moe-*.whl)
python "$repo/scripts/wheel_contents.py" "$work/src" "$wheel"

python -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps --force-reinstall "$wheel"
cd "$work"
"$work/venv/bin/python" "$repo/scripts/wheel_smoke.py" "$work"
echo "wheel check passed: $(basename "$wheel")"
