#!/usr/bin/env bash
# The GPU check: one command on a lent GPU machine (docs/performance.md, "GPU check").
#
#   bash scripts/gpu_check.sh          install the carried wheels (.whl/*.whl), then
#                                      scripts/gpu_check.py: bench, embedding, pytest -m gpu,
#                                      torch.compile; all inside 8 minutes of wall time
#   bash scripts/gpu_check.sh --dry    the same steps on CPU with the tiny profile (about a
#                                      minute, no wheel install): keeps the script from rotting
#
# Other arguments go to scripts/gpu_check.py (e.g. --only bench-eager,pytest-gpu).
# Outputs: $OUT/gpu_check.json, gpu_check.md, gpu_check.log ($OUT unset: out/gpu-check).
# Environment: PYTHON (default python3; --dry prefers .venv/bin/python), GPU_CHECK_BUDGET (s).
set -uo pipefail # no -e: a step that fails is recorded and the next one runs
started="$(date +%s)"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 2

dry=0
args=()
for arg in "$@"; do
  if [ "$arg" = --dry ]; then dry=1; else args+=("$arg"); fi
done
if [ "$dry" = 1 ]; then budget="${GPU_CHECK_BUDGET:-240}"; else budget="${GPU_CHECK_BUDGET:-480}"; fi
if [ -n "${PYTHON:-}" ]; then
  python="$PYTHON"
elif [ "$dry" = 1 ] && [ -x .venv/bin/python ]; then
  python=.venv/bin/python
else
  python=python3 # the lent machine's interpreter holds torch
fi
out="${OUT:-$repo/out/gpu-check}"
mkdir -p "$out"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# The lent machine lacks some packages; they travel as wheels in .whl/ (carry: [".whl"]) and
# install into a folder on PYTHONPATH, never into its Python. digi2real itself is used from
# this working tree, through PYTHONPATH as well.
install_status="skipped (dry run)"
install_seconds=0
site=""
if [ "$dry" = 0 ]; then
  shopt -s nullglob
  wheels=(.whl/*.whl)
  shopt -u nullglob
  if [ "${#wheels[@]}" -gt 0 ]; then
    site="$work/site"
    begin="$(date +%s)"
    if timeout 90 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$site" "${wheels[@]}" >"$work/install.log" 2>&1; then
      install_status="ok: ${#wheels[@]} wheels"
    else
      install_status="failed (exit $?): see install.log_tail"
    fi
    install_seconds=$(($(date +%s) - begin))
  else
    install_status="no wheels in .whl/ (was carry: [\".whl\"] given?)"
  fi
fi
export PYTHONPATH="$repo${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# gpu_check.py keeps to the budget itself; this stop only catches a hung driver: SIGTERM ends
# its running step's process group and writes the outputs, SIGKILL follows 10 s later
left=$((started + budget + 15 - $(date +%s)))
timeout --kill-after=10 "$left" "$python" scripts/gpu_check.py \
  ${args[@]+"${args[@]}"} \
  $([ "$dry" = 1 ] && echo --dry) \
  --out "$out" --python "$python" --started "$started" --budget "$budget" \
  --install-status "$install_status" --install-seconds "$install_seconds" \
  --install-log "$work/install.log"
code=$?
echo "[gpu_check.sh] exit $code in $(($(date +%s) - started)) s; outputs in $out"
exit "$code"
