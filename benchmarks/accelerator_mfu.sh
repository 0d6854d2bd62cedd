#!/usr/bin/env bash
# Issue 4's accelerator check: the GPT-2 124M shape (d768 L12 H12, vocabulary 50304, T 1024) in
# bf16 compute with fp32 parameters, about 50 steps of the training loop's own step, printing
# tokens/s and MFU against the device's data-sheet peak (llm_jax.metrics' table, e.g. H200 SXM
# 989 TFLOP/s bf16). Run it when a GPU/TPU is at hand; nothing in the tests depends on it.
#
#   bash benchmarks/accelerator_mfu.sh                 # BATCH=32 STEPS=50 ATTN=cudnn REMAT=none
#   BATCH=16 ATTN=xla bash benchmarks/accelerator_mfu.sh   # TPU: ATTN=xla
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import jax; d = jax.devices()[0]; print(f'{jax.device_count()} x {d.device_kind} ({d.platform})')"
python benchmarks/train_throughput.py --sizes=gpt2 --dtypes=bfloat16 --vocab_size=50304 --seq_len=1024 \
  --batch_size="${BATCH:-32}" --steps="${STEPS:-50}" --warmup=3 --attention_impl="${ATTN:-cudnn}" \
  --remat="${REMAT:-none}" --json="${OUT:-/tmp}/gpt2_mfu.json"
