#!/usr/bin/env bash
# The test command: sets up the environment if needed, then runs the unit tests and every notebook (smoke
# profile, generated data, offline) under nbval. Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/scripts/ensure_env.sh"
cd "$ROOT"
exec "$PY" -m pytest --nbval-lax --nbval-current-env "$@"
