#!/usr/bin/env bash
# Create (or refresh) a virtual environment with digi2real and its pinned dependencies.
# Usage: scripts/setup_env.sh [VENV_DIR]   (default .venv)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$here/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
# --no-deps: the lock is complete; resolving would pull insightface's onnxruntime and
# opencv-python beside onnxruntime-gpu and opencv-python-headless (same module folders).
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$here/requirements.lock"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$here"
"$venv/bin/python" -m digi2real.env
