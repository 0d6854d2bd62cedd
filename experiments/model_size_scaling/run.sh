#!/usr/bin/env bash
# The whole study in one command, from the repository root: the sweep (finished runs are skipped,
# interrupted ones resume), then the fits and plots into experiments/model_size_scaling/results_<scale>/.
#   bash experiments/model_size_scaling/run.sh [cpu|tpu|gpu|smoke] [--set=key=value ...]
set -euo pipefail
scale=${1:-cpu}
shift || true
python -m llm_jax.sweep run "experiments/model_size_scaling/sweep.py:scale=$scale" --root=runs/sweeps "$@"
python -m llm_jax.analyze params "runs/sweeps/model_size_scaling_$scale/results.csv" --out="experiments/model_size_scaling/results_$scale"
