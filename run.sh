#!/usr/bin/env bash
# One entry point for a fresh machine with Python 3.11:
#   ./run.sh demo        the main job: train a small CNN on the bundled digits data, compress it, export ONNX, report
#   ./run.sh test [ARGS] the test suite (pytest ARGS)
#   ./run.sh fxpress ... any fxpress CLI command;  ./run.sh python ... a Python in the project's environment
# The virtual environment lives outside the checkout, keyed by Python version and the pins in
# constraints.txt, so CI and repeated runs reuse it instead of installing 5 GB again.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
key="$("$py" -c 'import sys;print("py%d%d"%sys.version_info[:2])')-$(sha256sum "$here/constraints.txt" | cut -c1-12)"
venv="${FXPRESS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fxpress/venv-$key}"
stamp="$venv/.fxpress-stamp"
want="$(cat "$here/pyproject.toml" "$here/constraints.txt" | sha256sum | cut -c1-16)"
if [ ! -x "$venv/bin/python" ]; then
  echo "run.sh: creating $venv (first run installs torch and friends, a few minutes)" >&2
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "run.sh: installing fxpress[test] into $venv" >&2
  log="$venv/.fxpress-install.log"
  if ! "$venv/bin/python" -m pip install -c "$here/constraints.txt" -e "$here[test]" >"$log" 2>&1; then
    tail -40 "$log" >&2; echo "run.sh: pip install failed; full log: $log" >&2; exit 1
  fi
  echo "$want" > "$stamp"
fi
# the venv may be shared by several checkouts (it is keyed by the pins): this checkout's code comes first
export PATH="$venv/bin:$PATH" PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
cmd="${1:-demo}"; shift || true
case "$cmd" in
  demo) exec fxpress demo "$@" ;;
  test)
    cd "$here"
    set +e
    python -m pytest -n 2 -q "$@"
    rc=$?
    [ $rc -eq 5 ] && { echo "run.sh: pytest collected no tests" >&2; exit 1; }
    exit $rc ;;
  fxpress) exec fxpress "$@" ;;
  python) exec python "$@" ;;
  *) echo "usage: ./run.sh {demo|test|fxpress|python} [args]" >&2; exit 2 ;;
esac
