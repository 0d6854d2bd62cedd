#!/usr/bin/env bash
# The whole study in one command, from the repository root: the sweep (finished runs are skipped,
# interrupted ones resume), then the fits and plots into experiments/isoflop/results_<scale>/.
#   bash experiments/isoflop/run.sh [cpu|tpu|gpu|smoke] [--set=key=value ...]
set -euo pipefail
scale=${1:-cpu}
shift || true
python -m llm_jax.sweep run "experiments/isoflop/sweep.py:scale=$scale" --root=runs/sweeps "$@"
python -m llm_jax.analyze isoflop "runs/sweeps/isoflop_$scale/results.csv" --out="experiments/isoflop/results_$scale"
