#!/usr/bin/env bash
# Regenerate every figure and number: runs notebooks/01..05 headless with papermill, renders each to HTML and
# writes reports/index.html. Sets up its environment on first use.
#
#   ./run_all.sh                    # the profile that fits this machine: full with CUDA, else cpu (it says which)
#   ./run_all.sh quick              # a 10-minute tour of the whole pipeline on a 2-core CPU
#   ./run_all.sh cpu                # the committed study on a 2-core CPU (about 80 minutes; rewrites README's table)
#   ./run_all.sh full -p weights none -p data_dir /path/to/ham10000
#   ./run_all.sh --lab              # open the notebooks in JupyterLab with this project's environment and kernel
#   FRESH=1 ./run_all.sh quick      # retrain from scratch: drop this profile's checkpoints first
#   PRUNE=1 ./run_all.sh cpu        # and delete checkpoint folders that newer runs superseded (else listed)
#   HAM_PROFILE=quick ./run_all.sh  # the profile from the environment (a profile given as argument wins)
#
# Before any notebook starts, src/helpers/preflight.py checks in seconds what would fail later (the profile, the
# data folder, ImageNet weights when asked for, the output folder) and estimates the run's duration by timing a few
# training steps here. The notebooks write into a staging folder, <reports>/_partial/<profile>-<time>/; only when
# all five pass does it replace the reports (benchmark* files, _partial/ and dot-files stay). A failed run keeps its
# staged output there, names the notebook, cell and exception, and leaves the reports as they were. run_all.sh
# replaces only folders it made (marked with a .made-by-run_all file) or the checkout's own reports/.
#
# Checkpoints in models/<profile>/ are reused: an interrupted run resumes, a finished one is loaded, not retrained.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")" && pwd)
# Notebooks run with notebooks/ as their working directory: make paths given relative to the caller's absolute.
for var in HAM10000_DIR KAGGLEHUB_CACHE TORCH_HOME HAM_REPORTS_DIR HAM_MODELS_DIR HAM_CACHE_DIR HAM_RUN_NOTEBOOKS; do
  val=${!var:-}
  if [ -n "$val" ] && [ "${val#/}" = "$val" ]; then export "$var=$(realpath -m "$val")"; fi
done
cd "$ROOT"
profiles=$(cd src/helpers/profiles && ls *.yaml | sed 's/\.yaml$//' | paste -sd'|')
usage() {
  echo "usage: ./run_all.sh [$profiles] [papermill options, e.g. -p weights none -p data_dir DIR]"
  echo "       ./run_all.sh --lab    (open the notebooks in JupyterLab with this project's environment)"
  echo "no profile: \$HAM_PROFILE, else full when CUDA is visible and cpu otherwise"
}
PROFILE=
case "${1:-}" in
  -h|--help) usage; exit 0;;
  --lab) shift; source "$ROOT/scripts/ensure_env.sh"; exec "$PY" -m jupyter lab notebooks/ "$@";;
  -p|--parameters|-r|--parameters_raw|'') ;;
  -*) usage; exit 2;;
  *) PROFILE=$1; shift;;
esac
source "$ROOT/scripts/ensure_env.sh"

# Choose, check, estimate and stage, in one Python process; a failure prints its message alone and writes nothing.
envfile=$(mktemp)
trap 'rm -f "$envfile"' EXIT
"$PY" -m helpers.preflight start "$envfile" "$PROFILE" -- "$@" || exit 2
source "$envfile"   # PROFILE, OUT (the reports to replace), STAGE (where this run writes), UPDATE_README

if [ -n "${FRESH:-}" ]; then
  MODELS=$("$PY" -c "from helpers.config import output_dirs; print(output_dirs()['models'] / '$PROFILE')")
  echo "[run_all] FRESH: removing checkpoints $MODELS"; rm -rf "$MODELS"
fi
# The notebooks write into the stage; README's results block is rewritten only by a run of the committed profile
# into the checkout's reports/; the training loop prints a per-epoch table instead of live bars.
export HAM_REPORTS_DIR="$STAGE" HAM_PROFILE="$PROFILE" HAM_UPDATE_README="$UPDATE_README" HAM_HEADLESS=1
mkdir -p "$STAGE/notebooks"
echo "notebook,profile,seconds,status" > "$STAGE/timings.csv"
echo "[run_all] writing to $STAGE (replaces $OUT when every notebook passed)"
trap 'rm -f "$envfile"; echo; echo "[run_all] interrupted; $OUT unchanged, partial output in $STAGE"; exit 130' INT TERM
for nb in "${HAM_RUN_NOTEBOOKS:-notebooks}"/0*.ipynb; do   # tests point HAM_RUN_NOTEBOOKS at small notebooks
  name=$(basename "$nb" .ipynb)
  out="$STAGE/notebooks/$name.ipynb"
  echo "[run_all] $name (follow: tail -f $STAGE/notebooks/$name.log)"
  start=$(date +%s)
  status=ok
  "$PY" -m papermill "$nb" "$out" -k python3 --cwd notebooks -p profile "$PROFILE" "$@" \
      --no-progress-bar --log-level WARNING --stdout-file "$STAGE/notebooks/$name.log" \
      --stderr-file "$STAGE/notebooks/$name.stderr.log" 2> "$STAGE/notebooks/$name.papermill.log" || status=failed
  echo "$name,$PROFILE,$(( $(date +%s) - start )),$status" >> "$STAGE/timings.csv"
  [ -f "$out" ] && { "$PY" -m helpers.report html "$out" > /dev/null 2>> "$STAGE/notebooks/$name.papermill.log" || true; }
  if [ "$status" != ok ]; then
    echo "[run_all] $OUT is unchanged; this run's partial output stays in $STAGE"
    echo "[run_all] traceback and outputs: $out (and .html); papermill's log: $STAGE/notebooks/$name.papermill.log"
    if ! "$PY" -m helpers.preflight failed "$out" "notebooks/$name.ipynb"; then
      echo "[run_all] FAILED in notebooks/$name.ipynb without a Python exception in a cell (kernel died? out of memory?); last lines of papermill's log:"
      tail -n 5 "$STAGE/notebooks/$name.papermill.log" | sed 's/^/[run_all]   /'
    fi
    exit 1
  fi
done
rm -f "$STAGE"/notebooks/*.ipynb "$STAGE"/notebooks/*.log   # the HTML renderings hold the same outputs
"$PY" -m helpers.report index "$STAGE" > /dev/null
"$PY" -m helpers.preflight publish "$STAGE" "$OUT"
echo "[run_all] done: $OUT/index.html"
column -s, -t < "$OUT/timings.csv"
# Checkpoint folders that a newer run of the same name replaced (a changed recipe or training code): listed, or
# deleted with PRUNE=1. The current runs' folders are never touched.
"$PY" -m helpers.experiment prune "$PROFILE" ${PRUNE:+--delete} | sed 's/^/[run_all] /'

