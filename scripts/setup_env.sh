#!/usr/bin/env bash
# Create (or refresh) a virtual environment with digi2real and its pinned dependencies.
# Usage: scripts/setup_env.sh [VENV_DIR]   (default .venv)
#   ONNXRUNTIME=onnxruntime-gpu scripts/setup_env.sh      CUDA host: GPU onnxruntime
#   OPENCV=opencv-python-headless scripts/setup_env.sh    host without libGL: headless OpenCV
# Unset, each keeps what VENV_DIR already holds (a swap survives a refresh), else the lock's
# onnxruntime / opencv-python: the distributions insightface declares. README "Install".
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$here/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }
holds() { pip show -q "$1" >/dev/null 2>&1; }

# pick one of a pair that shares a module folder: $1 the lock's, $2 its twin, $3 the request
pick() {
  case "${3:-}" in
    "$1" | "$2") echo "$3" ;;
    "") if holds "$2" && ! holds "$1"; then echo "$2"; else echo "$1"; fi ;;
    *) echo "error: expected $1 or $2, got '$3'" >&2; return 2 ;;
  esac
}
ort="$(pick onnxruntime onnxruntime-gpu "${ONNXRUNTIME:-}")"
cv="$(pick opencv-python opencv-python-headless "${OPENCV:-}")"

# Leaving one of a pair for its twin: uninstall both first (uninstalling either after the other
# is in place would delete the shared files); the lock below installs the chosen one afresh.
unpair() { # $1 the chosen one, $2 its twin
  if holds "$2"; then
    if holds "$1"; then pip uninstall --quiet -y "$1" "$2"; else pip uninstall --quiet -y "$2"; fi
  fi
}
if [ "$ort" = onnxruntime ]; then unpair onnxruntime onnxruntime-gpu; else unpair onnxruntime-gpu onnxruntime; fi
if [ "$cv" = opencv-python ]; then unpair opencv-python opencv-python-headless; else unpair opencv-python-headless opencv-python; fi

# --no-deps: the lock is complete (pip check below proves it) and nothing is resolved beyond
# it; a twin gets the lock's version of the distribution it replaces (they release together).
lock="$(mktemp)"
trap 'rm -f "$lock"' EXIT
sed -e "s/^onnxruntime==/$ort==/" -e "s/^opencv-python==/$cv==/" "$here/requirements.lock" >"$lock"
pip install --quiet --no-deps -r "$lock"
pip install --quiet --no-deps -e "$here"
# Dropped from the lock (the CLIP vocabulary now ships in digi2real): gone from an older venv
# too, or pip check reports open_clip_torch's missing timm/torchvision.
for retired in open_clip_torch ftfy wcwidth; do
  if holds "$retired"; then pip uninstall --quiet -y "$retired"; fi
done

# Clean for the lock as it is; after a swap, the requirement of the replaced distribution by
# insightface and digi2real (both import its module) is all that may be reported.
swapped=""
[ "$ort" = onnxruntime ] || swapped="onnxruntime"
[ "$cv" = opencv-python ] || swapped="${swapped:+$swapped|}opencv-python"
if ! report="$(pip check 2>&1)"; then
  rest="$report"
  if [ -n "$swapped" ]; then
    rest="$(printf '%s\n' "$report" | grep -vE "^(insightface|digi2real) [^ ]+ requires ($swapped), which is not installed\.$" || true)"
  fi
  if [ -n "$rest" ]; then
    printf '%s\n' "$report" >&2
    exit 1
  fi
  printf 'pip check (expected: %s / %s stand in for these):\n%s\n' "$ort" "$cv" "$report"
fi

if ! "$venv/bin/python" -c "import cv2, onnxruntime" 2>/dev/null; then
  "$venv/bin/python" -c "import cv2, onnxruntime" || true
  echo "error: cv2/onnxruntime do not import. opencv-python needs libGL and GLib" \
    "(Debian: apt-get install libgl1 libglib2.0-0), or use" \
    "OPENCV=opencv-python-headless $0 $venv" >&2
  exit 1
fi
"$venv/bin/python" -m digi2real.env
