#!/usr/bin/env bash
# Regenerate every figure and number: runs notebooks/01..05 headless with papermill, renders each to HTML and
# writes reports/index.html. Sets up its environment on first use.
#
#   ./run_all.sh                    # the profile that fits this machine: full with CUDA, else cpu (it says which)
#   ./run_all.sh quick              # a 10-minute tour of the whole pipeline on a 2-core CPU
#   ./run_all.sh cpu                # the committed study on a 2-core CPU (about 75 minutes; rewrites README's table)
#   ./run_all.sh full -p weights none -p data_dir /path/to/ham10000
#   ./run_all.sh --lab              # open the notebooks in JupyterLab with this project's environment and kernel
#   FRESH=1 ./run_all.sh quick      # retrain from scratch: drop this profile's checkpoints first
#   PRUNE=1 ./run_all.sh cpu        # and delete checkpoint folders that newer runs superseded (else listed)
#   HAM_PROFILE=quick ./run_all.sh  # the profile from the environment (a profile given as argument wins)
#
# This script only sets up the environment; src/helpers/runner.py does the rest: preflight checks in seconds what
# would fail later (profile, data, weights, output folder) and estimates the duration by timing training steps
# here; the notebooks write into <reports>/_partial/<profile>-<time>/, which replaces the reports only when all
# five pass (benchmark* files, _partial/ and dot-files stay). A failed run names the notebook, cell and exception
# and leaves the reports as they were. Checkpoints in models/<profile>/ are reused: an interrupted run resumes, a
# finished one is loaded, not retrained.
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
  echo "usage: ./run_all.sh [$profiles] [-p NAME VALUE]... [-r NAME RAW_VALUE]...  (e.g. -p weights none -p data_dir DIR)"
  echo "       ./run_all.sh --lab    (open the notebooks in JupyterLab with this project's environment)"
  echo "no profile: \$HAM_PROFILE, else full when CUDA is visible and cpu otherwise"
}
case "${1:-}" in
  -h|--help) usage; exit 0;;
  --lab) shift; source "$ROOT/scripts/ensure_env.sh"; exec "$PY" -m jupyter lab notebooks/ "$@";;
  -p|--parameters|-r|--parameters_raw|'') ;;
  -*) usage; exit 2;;
esac
source "$ROOT/scripts/ensure_env.sh"
exec "$PY" -m helpers.runner "$@"
