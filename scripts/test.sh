#!/usr/bin/env bash
# Set up .venv, start the local Slurm cluster, run the test suite, stop the cluster.
# Arguments go to pytest, e.g. `bash scripts/test.sh -k cosine`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
PY="${FCMAE_VENV:-$ROOT/.venv}/bin/python"

# The slurm-marked tests need a running cluster; stop it again however pytest ends,
# unless it was already running before this script.
already_running=false
if bash scripts/local_slurm.sh status >/dev/null 2>&1; then
    already_running=true
fi
eval "$(bash scripts/local_slurm.sh start)"
if [[ "$already_running" == false ]]; then
    trap 'bash scripts/local_slurm.sh stop >&2 || true' EXIT
fi

"$PY" -m pytest -ra "$@"
