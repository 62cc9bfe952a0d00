#!/usr/bin/env bash
# Measure FCMAE pretraining on one CUDA GPU. Stages: the step table at batch 128 (atto
# and base, bf16 and fp32, dense and sparse encoders), the top ops of the atto sparse step,
# the bf16 accuracy check, and the data-loader rate per worker on this machine's CPUs.
#
# Usage, from anywhere inside a checkout:
#   bash benchmarks/gpu_check.sh [OUTPUT_FOLDER]
# OUTPUT_FOLDER defaults to $OUT when set, else runs/gpu_check in the checkout. Set PYTHON
# to choose the interpreter (default: .venv/bin/python when it exists, else python3), and
# GPU_CHECK_COMPILE=1 to also time torch.compile (adds minutes of compilation).
# Without a CUDA device it runs a short CPU smoke pass of the same scripts instead, which
# checks the script path but measures nothing about GPUs.
#
# Each stage has its own time limit, about 8 minutes in all. A stage that fails or times
# out is reported, and the next one still runs. The exit status is the number of failed stages.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-${OUT:-$repo/runs/gpu_check}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$repo"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

failed=0

# run_stage NAME SECONDS COMMAND...: run one stage, keep its output in $out/NAME.txt.
run_stage() {
    local name=$1 seconds=$2
    shift 2
    echo "=== $name (limit ${seconds} s): $*"
    timeout "$seconds" "$@" 2>&1 | tee "$out/$name.txt"
    local status=${PIPESTATUS[0]}
    if [[ $status -eq 124 ]]; then
        echo "=== $name timed out after ${seconds} s"
        failed=$((failed + 1))
    elif [[ $status -ne 0 ]]; then
        echo "=== $name failed with exit status $status"
        failed=$((failed + 1))
    fi
}

if ! import_error=$("$PYTHON" -c "import torch, torchvision, timm, PIL" 2>&1); then
    echo "error: $PYTHON cannot import torch, torchvision, timm and PIL: $import_error" >&2
    echo "install the project's dependencies (pip install -e .) or set PYTHON to an interpreter that has them" >&2
    exit 2
fi

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to $PYTHON: running the CPU smoke pass only (no GPU figures)"
    run_stage cpu_step 300 "$PYTHON" benchmarks/pretrain_step.py --quick --skip_analysis \
        --output_json "$out/cpu_step.json"
    run_stage cpu_bf16_check 300 "$PYTHON" benchmarks/bf16_check.py --steps 3 --tail 3 --seeds 1 --input_size 64 \
        --output_json "$out/cpu_bf16_check.json"
    echo "results in $out; failed stages: $failed"
    exit "$failed"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia_smi.txt"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version())" \
    | tee -a "$out/nvidia_smi.txt"

# The step table: images/s per GPU and peak memory (torch.cuda.max_memory_allocated).
run_stage gpu_step 240 "$PYTHON" benchmarks/pretrain_step.py --device cuda --sizes atto,base \
    --batch_size 128 --dtypes bf16,fp32 --steps 20 --warmup 5 --skip_analysis --output_json "$out/gpu_step.json"

# What bounds the atto step: top CUDA kernels by self time, bf16.
run_stage gpu_profile 90 "$PYTHON" benchmarks/pretrain_step.py --device cuda --sizes atto --batch_size 128 \
    --dtypes bf16 --warmup 5 --skip_step --skip_analysis --profile

run_stage gpu_bf16_check 90 "$PYTHON" benchmarks/bf16_check.py --device cuda --output_json "$out/gpu_bf16_check.json"

# Workers needed per GPU at the measured step rate: ceil(step images/s / per-worker images/s).
run_stage data_pipeline 90 "$PYTHON" benchmarks/data_pipeline.py --workers 0,1,4,8 --num_batches 40 \
    --repeats 1 --output_json "$out/data_pipeline.json"

if [[ "${GPU_CHECK_COMPILE:-0}" == 1 ]]; then
    run_stage gpu_compile 400 "$PYTHON" benchmarks/pretrain_step.py --device cuda --sizes atto \
        --batch_size 128 --dtypes bf16 --steps 20 --warmup 5 --skip_step --skip_analysis --compile
fi

echo "results in $out; failed stages: $failed"
exit "$failed"
