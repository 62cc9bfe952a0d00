#!/usr/bin/env bash
# Refresh results/<experiment>/ from the run folders under runs/results: measure the final
# encoders (python -m analysis aggregate), copy the tables, activation maps, wall times and
# training curves, then redraw every figure from the copied tables.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${FCMAE_VENV:-.venv}/bin/python"
RUNS="${RESULTS_RUNS:-runs/results}"

for experiment in atto_v1_v2 atto_v1_v2_seed1 capacity_probe_30ep capacity_probe capacity_probe_30ep_seeds; do
    sweep="$RUNS/$experiment"
    dest="results/$experiment"
    if [[ ! -d "$sweep" ]]; then
        echo "export: $sweep not found; run $dest/run.sh first" >&2
        continue
    fi
    # Measures only members without an up-to-date cosine_distance.csv.
    "$PY" -m analysis aggregate "$sweep" > /dev/null
    cp "$sweep"/{summary,layer_distances,collapse_history}.csv "$dest/"
    mkdir -p "$dest/activations"
    cp "$sweep"/figures/activations_*.png "$dest/activations/"
    "$PY" results/collect.py "$sweep" "$dest"
done

# Measured on images outside the training photos, for the experiments that have such a table.
for experiment in capacity_probe_30ep_seeds; do
    if [[ -d "$RUNS/$experiment" ]]; then
        bash results/measure_heldout.sh "$experiment" > /dev/null
    fi
done

"$PY" -m analysis replot results
