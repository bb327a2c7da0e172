#!/usr/bin/env bash
# GPU smoke test (one CUDA GPU, under 5 minutes): every objective on the shapes models in bf16 and on
# tiny SDXL / FLUX pipelines, with images/s and peak memory per run (runs/gpu_smoke/gpu_smoke.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python launch/gpu_smoke.py --device cuda --epochs "${EPOCHS:-2}" "$@"
