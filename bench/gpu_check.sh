#!/usr/bin/env bash
# One prepared GPU check, under 8 minutes on one H200 (steps: bench/gpu_check.py's docstring):
#   1. ResNet-50 at 224px on a synthetic ImageNet-size .beton: NCCL, bf16, channels_last, FFCV ToDevice -> img/s per GPU
#   2. configs/fmnist_science.yaml, every stage, a few epochs, on the GPU
#   3. the science baseline checkpoint scored on the GPU and on the CPU: AUROCs within 0.1 points
#
#   bash bench/gpu_check.sh              # on a machine with an NVIDIA GPU
#   bash bench/gpu_check.sh --dry-run    # the same steps on a CPU machine at tiny sizes (gloo, fp32)
#   bash bench/gpu_check.sh --help       # sizes and the scratch folder
#
# Python: $PYTHON if set (an environment that has oodlab and its dependencies installed), else the repo's .venv,
# created by scripts/setup.sh when missing (that needs the package registries; step 2 needs the Fashion-MNIST
# files the set-up installs, /usr/share/datasets/fashion-mnist).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  [ -x .venv/bin/python ] || bash scripts/setup.sh
  PYTHON=.venv/bin/python
fi
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS=0
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
start=$(date +%s)
status=0
"$PYTHON" bench/gpu_check.py "$@" || status=$?
echo "gpu_check: $(( $(date +%s) - start )) s in all, exit status $status"
exit $status
