#!/usr/bin/env bash
# The whole study in one command, from the repository root: the corpus and the held-out mappings
# (deterministic, a few seconds), the runs (finished runs are skipped, interrupted ones resume),
# then every run's 0/1/4/8/16-shot accuracy on the held-out mappings, the table and the plots.
#   bash experiments/icl_scaling/run.sh [cpu|tpu|gpu|smoke] [--set=key=value ...]
set -euo pipefail
scale=${1:-cpu}
shift || true
data=runs/icl_data_${scale%_short}  # where experiments/icl_scaling/sweep.py reads its corpus (data.files)
shots=0,1,4,8,16
[ "$scale" = cpu_short ] && shots=0,1,4,8  # 32-token rows
case $scale in tpu|gpu) documents=200000 ;; smoke) documents=200 ;; *) documents=10000 ;; esac  # 900 tokens each
[ -d "$data/train" ] || python -m llm_jax.data.icl corpus --out="$data/train" --documents=$documents
[ -d "$data/tasks" ] || python -m llm_jax.data.icl tasks --out="$data/tasks" --mappings=40
python -m llm_jax.sweep run "experiments/icl_scaling/sweep.py:scale=$scale" --root=runs/sweeps "$@"
python -m llm_jax.analyze icl "runs/sweeps/icl_scaling_$scale/results.csv" \
    --out="experiments/icl_scaling/results_$scale" --tasks="$data/tasks/*.jsonl" --shots=$shots
