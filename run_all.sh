#!/usr/bin/env bash
# Regenerate every figure and number: runs notebooks/01..05 headless with papermill, renders each to HTML and
# writes reports/index.html. Sets up its environment on first use.
#
#   ./run_all.sh [PROFILE] [papermill options]
#   ./run_all.sh                    # full analysis (sized for a GPU)
#   ./run_all.sh quick              # whole pipeline on a 2-core CPU in under 15 minutes
#   ./run_all.sh full -p weights none -p data_dir /path/to/ham10000
#   FRESH=1 ./run_all.sh quick      # retrain from scratch: drop this profile's checkpoints first
#
# Checkpoints in models/<profile>/ are reused: an interrupted run resumes, a finished one is loaded, not retrained.
#
# Stops at the first failing notebook, names it, keeps its partial output and exits non-zero.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")" && pwd)
# Notebooks run with notebooks/ as their working directory: make paths given relative to the caller's absolute.
for var in HAM10000_DIR KAGGLEHUB_CACHE TORCH_HOME HAM_REPORTS_DIR HAM_MODELS_DIR HAM_CACHE_DIR; do
  val=${!var:-}
  if [ -n "$val" ] && [ "${val#/}" = "$val" ]; then export "$var=$(realpath -m "$val")"; fi
done
cd "$ROOT"
PROFILE=${1:-full}
[ $# -gt 0 ] && shift
case "$PROFILE" in -*) echo "usage: ./run_all.sh [full|quick|smoke] [papermill options]"; exit 2;; esac
source "$ROOT/scripts/ensure_env.sh"
"$PY" -c "from helpers.config import load_profile; load_profile('$PROFILE')" || exit 2
if [ "$PROFILE" = smoke ] && [ -z "${HAM_REPORTS_DIR:-}" ]; then export HAM_REPORTS_DIR="$ROOT/reports/smoke"; fi
OUT=${HAM_REPORTS_DIR:-$ROOT/reports}
if [ "$PROFILE" = full ] && [ -z "${ALLOW_CPU:-}" ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "The full profile is sized for a GPU and none is visible here (it would take days on a CPU)."
  echo "Run './run_all.sh quick' (under 15 minutes on 2 cores), or set ALLOW_CPU=1 to run it anyway."
  exit 2
fi

# A full regeneration: the previous run's generated reports go (the image cache and checkpoints stay).
if [ -n "${FRESH:-}" ]; then
  MODELS=$("$PY" -c "from helpers.config import output_dirs; print(output_dirs()['models'] / '$PROFILE')")
  echo "[run_all] FRESH: removing checkpoints $MODELS"; rm -rf "$MODELS"
fi
mkdir -p "$OUT"
find "$OUT" -mindepth 1 -maxdepth 1 ! -name smoke ! -name 'benchmark*' -exec rm -rf {} +
mkdir -p "$OUT/notebooks"
echo "notebook,profile,seconds,status" > "$OUT/timings.csv"
echo "[run_all] profile $PROFILE -> $OUT"
for nb in notebooks/0*.ipynb; do
  name=$(basename "$nb" .ipynb)
  echo "[run_all] $name"
  start=$(date +%s)
  status=ok
  "$PY" -m papermill "$nb" "$OUT/notebooks/$name.ipynb" -k python3 --cwd notebooks \
      -p profile "$PROFILE" "$@" --no-progress-bar --log-level WARNING || status=failed
  echo "$name,$PROFILE,$(( $(date +%s) - start )),$status" >> "$OUT/timings.csv"
  "$PY" -m jupyter nbconvert --log-level WARN --to html "$OUT/notebooks/$name.ipynb" --output-dir "$OUT/notebooks" || true
  if [ "$status" != ok ]; then
    echo "[run_all] FAILED in notebooks/$name.ipynb; its partial output is in $OUT/notebooks/$name.ipynb (.html)"
    exit 1
  fi
done
rm -f "$OUT"/notebooks/*.ipynb   # the HTML renderings hold the same outputs; keep reports small
"$PY" -m helpers.report index "$OUT"
echo "[run_all] done: $OUT/index.html"
column -s, -t < "$OUT/timings.csv"
