#!/usr/bin/env bash
# Reproduce results/capacity_probe (or the experiment named by $1, e.g. capacity_probe_30ep):
# launch results/<experiment>/sweep.yaml as a Slurm job array (two members at a time, one CPU
# each) on the cluster that SLURM_CONF names, by default the local one of
# scripts/local_slurm.sh, which it starts if SLURM_CONF is unset (that needs root and
# Debian's apt; stop it afterwards with scripts/local_slurm.sh stop). Each member gets an
# afterok cosine-distance job and the sweep an afterany aggregate job, which writes the
# tables and figures into the sweep folder. Then run results/export.sh to refresh the CSVs
# and figures in results/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY="${FCMAE_VENV:-.venv}/bin/python"
EXPERIMENT="${1:-capacity_probe}"
OUT="${RESULTS_RUNS:-runs/results}/$EXPERIMENT"

if [[ -z "${SLURM_CONF:-}" ]]; then
    bash scripts/local_slurm.sh start
    export SLURM_CONF="${LOCAL_SLURM_DIR:-/tmp/fcmae-slurm}/etc/slurm.conf"
fi
"$PY" run_with_submitit.py sweep launch "results/$EXPERIMENT/sweep.yaml" --sweep_dir "$OUT" \
    --array_parallelism 2

# The aggregate job runs after every member has ended, so it is the last one to wait for.
aggregate=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["aggregate_job_id"])' \
    "$OUT/manifest.json")
while queued=$(squeue -h -j "$aggregate" -o %i 2>/dev/null) && [[ -n "$queued" ]]; do
    sleep 30
done
"$PY" run_with_submitit.py sweep status "$OUT"
