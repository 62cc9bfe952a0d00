#!/usr/bin/env bash
# Set up the environment, then pretrain ConvNeXt V1 and V2 atto as FCMAE on the sample
# photos through submitit (Slurm if sbatch is on PATH, else the local executor), and
# measure and plot their feature collapse. Results land in runs/demo/ (or $DEMO_DIR).
# Takes about 10 minutes on 2 CPU cores.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
PY="${FCMAE_VENV:-$ROOT/.venv}/bin/python"

DEMO_DIR="${DEMO_DIR:-runs/demo}"
EPOCHS="${DEMO_EPOCHS:-12}"
COMMON=(--data sample --input_size 128 --mask_ratio 0.6 --epochs "$EPOCHS" --warmup_epochs 2
        --batch_size 16 --blr 1.5e-2 --num_workers 1 --cpus_per_task 2 --log_every 20
        --timeout_min 60 --cluster "${DEMO_CLUSTER:-auto}" --wait)

for model in convnext_atto convnextv2_atto; do
    echo "demo: pretraining $model"
    "$PY" run_with_submitit.py pretrain --model "$model" --output_dir "$DEMO_DIR/$model" "${COMMON[@]}"
done

echo "demo: measuring per-layer feature cosine distance"
"$PY" -m analysis cosine "$DEMO_DIR/convnext_atto" "$DEMO_DIR/convnextv2_atto" --output_dir "$DEMO_DIR"
"$PY" -m analysis figures "$DEMO_DIR"
"$PY" -m analysis activations "$DEMO_DIR/convnext_atto" "$DEMO_DIR/convnextv2_atto" --output_dir "$DEMO_DIR"

echo "demo: done. Figures: $DEMO_DIR/cosine_distance.png, $DEMO_DIR/cosine_distance.pdf, $DEMO_DIR/activations.png"
echo "demo: TensorBoard: $PY -m tensorboard.main --logdir $DEMO_DIR"
