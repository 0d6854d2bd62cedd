#!/usr/bin/env bash
# The whole study in one command, from the repository root: the three runs (finished runs are
# skipped, interrupted ones resume), then the probe, whose table is printed and whose JSON goes to
# experiments/representation_probe/probe_<scale>.json.
#   bash experiments/representation_probe/run.sh [cpu|tpu|gpu|smoke] [--set=key=value ...]
# The probe labels tokens with Python's `tokenize`: a larger corpus must be Python sources
# (--set=data.dataset=files --set=data.files='/src/**/*.py').
set -euo pipefail
scale=${1:-cpu}
shift || true
python -m llm_jax.sweep run "experiments/representation_probe/sweep.py:scale=$scale" --root=runs/sweeps "$@"
runs="runs/sweeps/representation_probe_$scale"
python -m llm_jax.probe --word2vec="$runs/word2vec" --bert="$runs/bert" --gpt="$runs/gpt" \
    --out="experiments/representation_probe/probe_$scale.json"
