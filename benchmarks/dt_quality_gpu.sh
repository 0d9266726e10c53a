#!/usr/bin/env bash
# glmgym DT table runs on one NVIDIA GPU: one dt_quality.py process per dataset:seed, all at once
# (a DT of this size leaves most of the GPU idle, so the processes share it), fp32, end windows
# and the paper's init (DT_INIT=gpt2 for the earlier runs' init) as the CPU runs. Each writes its
# part file; fold them with `dt_quality.py --merge` afterwards.
# Results: <out>/<dataset>-seed<N>.json and .log, the run folders under <out>/runs/.
#
#   bash benchmarks/dt_quality_gpu.sh OUT_DIR hopper-medium:0 hopper-medium:1 ...
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MUJOCO_GL=egl OMP_NUM_THREADS=1
py=${PYTHON:-python3}
out=$1; shift
mkdir -p "$out/runs"
pids=()
for item in "$@"; do
    ds=${item%:*} seed=${item#*:}
    "$py" benchmarks/dt_quality.py --methods glmgym_dt --datasets "$ds" --seeds "$seed" --windows end \
        --init "${DT_INIT:-paper}" --steps "${DT_STEPS:-10000}" --warmup "${DT_WARMUP:-1000}" --precision fp32 --runs "$out/runs" --out "$out/$ds-seed$seed.json" \
        > "$out/$ds-seed$seed.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
