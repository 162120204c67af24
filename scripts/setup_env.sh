#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install sparse_vdit into it, torch first; leaves it
# activated. Safe to source from an interactive shell: it changes no shell options and returns
# (never exits) on failure.
# Usage: source scripts/setup_env.sh [extras]   e.g. "test" or "plot"
# TORCH_SPEC picks the torch build (default torch==2.13.0, a CPU build; on a CUDA machine e.g. "torch>=2.5").
# SPARSE_VDIT_VENV picks the folder (default .venv in the repository).

# pip install ARGS, its full output appended to LOG, the lines matching PATTERN shown as progress;
# pip's exit status goes to LOG.status (the caller may run under set -e -o pipefail).
# A line every 10 s while pip works silently (unpacking torch takes a minute).
_sparse_vdit_pip() {
  local log="$1" pattern="$2" beat start
  shift 2
  start=$(date +%s)
  { while sleep 10; do echo "[setup]   ... still installing ($(( $(date +%s) - start )) s)"; done; } &
  beat=$!
  ( pip install "$@" 2>&1; echo $? >"$log.status" ) | tee -a "$log" \
    | { grep --line-buffered -E "$pattern" || true; } | sed -u 's/^/[setup]   /'
  kill "$beat" 2>/dev/null
  wait "$beat" 2>/dev/null || true
}

_sparse_vdit_setup() {
  local root venv extras spec log
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
  venv="${SPARSE_VDIT_VENV:-$root/.venv}"
  extras="${1:-}"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || { echo "setup_env.sh: could not create $venv" >&2; return 1; }
  fi
  # shellcheck disable=SC1091
  source "$venv/bin/activate" || return 1
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  # torch before anything that depends on it, so no dependency pulls a different (multi-GB) build.
  spec="$root"
  [ -n "$extras" ] && spec="$root[$extras]"
  log="$venv/pip-install.log"
  : >"$log"
  if ! python -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0} into $venv (first time only; 1-2 minutes)"
    # pip's own progress, one line per package; its notes about local index folders are noise here.
    _sparse_vdit_pip "$log" "^(Collecting|Downloading|Installing|Successfully)" "${TORCH_SPEC:-torch==2.13.0}"
    if [ "$(cat "$log.status")" -ne 0 ]; then
      grep -v "^WARNING: Location" "$log" >&2
      echo "setup_env.sh: installing torch failed (log above)" >&2
      return 1
    fi
  fi
  echo "[setup] installing sparse_vdit${extras:+[$extras]} and its dependencies (about a minute the first time)"
  _sparse_vdit_pip "$log" "^(Collecting|Installing|Successfully)" -e "$spec"
  if [ "$(cat "$log.status")" -ne 0 ]; then
    grep -v "^WARNING: Location" "$log" >&2
    echo "setup_env.sh: installing sparse_vdit failed (log above)" >&2
    return 1
  fi
  python -c "import sparse_vdit" || { echo "setup_env.sh: sparse_vdit does not import" >&2; return 1; }
  echo "[setup] ready: $venv"
}

_sparse_vdit_setup "$@"
_sparse_vdit_status=$?
unset -f _sparse_vdit_setup _sparse_vdit_pip
if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  return $_sparse_vdit_status  # sourced
fi
exit $_sparse_vdit_status
