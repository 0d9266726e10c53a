#!/usr/bin/env bash
# The GPU check (one NVIDIA GPU, at most 8 minutes): the CUDA tests, then chat decoding in bf16 /
# INT8 / INT4 on the full-size random ChatGLM-6B, DT training steps/s and vectorized evaluation.
# Uses the machine's own torch (no install); gymnasium/mujoco are optional (evaluation is skipped
# without them). Results: benchmarks/results/gpu_speed.json, and $OUT/ when set.
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MUJOCO_GL=egl
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
timeout 180 "$py" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider || status=$?
timeout 300 "$py" benchmarks/gpu_speed.py || status=$?
if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu_speed.json "$OUT/" 2>/dev/null || true; fi
exit $status
