# Sourced by run_all.sh and tests/run.sh: make sure a Python environment with this project is ready, then set $PY.
# - inside an active conda env or venv: use it (after `conda env create -f environment.yml`, say);
# - otherwise: create ./.venv with python3 -m venv.
# Either way `pip install -e ".[test]"` runs when the project is not installed from this checkout or
# pyproject.toml changed since the last install.
ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
if [ -n "${CONDA_PREFIX:-}" ] || [ -n "${VIRTUAL_ENV:-}" ]; then
  PY=$(command -v python)
else
  if [ ! -x "$ROOT/.venv/bin/python" ]; then
    echo "[setup] creating $ROOT/.venv"
    python3 -m venv "$ROOT/.venv" || { echo "[setup] python3 -m venv failed (Debian: apt-get install python3-venv)"; return 1 2>/dev/null || exit 1; }
  fi
  PY="$ROOT/.venv/bin/python"
fi
_want="$ROOT $(cksum < "$ROOT/pyproject.toml")"
_stamp="$("$PY" -c 'import sys; print(sys.prefix)')/.skin-resnets-installed"
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ] || \
   ! "$PY" -c "import helpers, papermill, nbval, sys; sys.exit(not helpers.__file__.startswith('$ROOT/src'))" 2>/dev/null; then
  echo "[setup] installing the project and its dependencies into $("$PY" -c 'import sys; print(sys.prefix)') (first run: a few minutes)"
  "$PY" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  "$PY" -m pip install --quiet -e "$ROOT[test]" || { echo "[setup] pip install failed"; return 1 2>/dev/null || exit 1; }
  echo "$_want" > "$_stamp"
fi
export MPLBACKEND=${MPLBACKEND:-Agg}
