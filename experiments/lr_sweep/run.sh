#!/usr/bin/env bash
# The whole study in one command, from the repository root: the sweep (finished runs are skipped,
# interrupted ones resume), then the fits and plots into experiments/lr_sweep/results_<scale>/.
#   bash experiments/lr_sweep/run.sh [cpu|tpu|gpu|smoke] [--set=key=value ...]
set -euo pipefail
scale=${1:-cpu}
shift || true
python -m llm_jax.sweep run "experiments/lr_sweep/sweep.py:scale=$scale" --root=runs/sweeps "$@"
python -m llm_jax.analyze lr "runs/sweeps/lr_sweep_$scale/results.csv" --out="experiments/lr_sweep/results_$scale"
