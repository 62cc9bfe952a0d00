#!/usr/bin/env bash
# Reproduce results/atto_v1_v2: ConvNeXt V1 and V2 atto pretrained as FCMAE on the sample
# photos at 128 px, mask ratio 0.6, 250 epochs of 288 crops (2250 optimizer steps of 32).
# The two runs go side by side with one CPU thread each; checkpoints stay in
# runs/results/atto_v1_v2 (not committed). Then run results/export.sh to refresh the CSVs
# and figures in this folder. `run.sh SEED` repeats the pair with another seed into
# atto_v1_v2_seed<SEED>.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY="${FCMAE_VENV:-.venv}/bin/python"
SEED="${1:-0}"
EXPERIMENT=atto_v1_v2
if [[ "$SEED" != 0 ]]; then
    EXPERIMENT="atto_v1_v2_seed$SEED"
fi
OUT="${RESULTS_RUNS:-runs/results}/$EXPERIMENT"
mkdir -p "$OUT"

COMMON=(--data sample --input_size 128 --mask_ratio 0.6 --epochs 250 --warmup_epochs 12
        --batch_size 32 --lr 1.5e-3 --weight_decay 0.05 --num_workers 1 --cpus_per_task 1
        --log_every 9 --recon_every 25 --collapse_every 10 --collapse_images 16
        --timeout_min 240 --cluster local --wait --seed "$SEED")

pids=()
for model in convnext_atto convnextv2_atto; do
    "$PY" run_with_submitit.py pretrain --model "$model" --output_dir "$OUT/$model" "${COMMON[@]}" \
        > "$OUT.$model.log" 2>&1 &
    pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
if ((status)); then
    echo "a run failed; see $OUT.convnext_atto.log and $OUT.convnextv2_atto.log" >&2
fi
exit "$status"
