#!/usr/bin/env bash
# Measure the final encoders of a results sweep on images they were not trained on. These are
# the nine pictures shipped with scikit-image that --data sample leaves out: grey photographs
# and textures, a cell, coins, the moon, a retina and a stained tissue section. Run it after the
# experiment's run.sh, while its run folders exist under runs/results. Writes
# results/<experiment>/heldout/cosine_distance.csv (one row per run and layer) and .json.
# Usage: bash results/measure_heldout.sh [EXPERIMENT]   (default capacity_probe_30ep_seeds)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${FCMAE_VENV:-.venv}/bin/python"
RUNS="${RESULTS_RUNS:-runs/results}"
EXPERIMENT="${1:-capacity_probe_30ep_seeds}"
SWEEP="$RUNS/$EXPERIMENT"
IMAGES="$RUNS/heldout_images"

if [[ ! -d "$SWEEP" ]]; then
    echo "measure_heldout: $SWEEP not found; run results/$EXPERIMENT/run.sh first" >&2
    exit 1
fi

mkdir -p "$IMAGES"
skimage_data=$("$PY" -c 'import pathlib, skimage; print(pathlib.Path(skimage.__file__).parent / "data")')
for name in brick.png camera.png cell.png coins.png grass.png gravel.png ihc.png moon.png retina.jpg; do
    cp "$skimage_data/$name" "$IMAGES/"
done

runs=$(find "$SWEEP" -mindepth 2 -maxdepth 2 -name final_metrics.json -printf '%h\n' | sort | paste -sd, -)
if [[ -z "$runs" ]]; then
    echo "measure_heldout: no completed run in $SWEEP" >&2
    exit 1
fi
"$PY" -m analysis cosine "$runs" --images "$IMAGES" --output_dir "results/$EXPERIMENT/heldout" \
    --tensorboard=False
