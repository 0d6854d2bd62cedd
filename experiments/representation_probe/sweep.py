"""Study 5, what context buys: word2vec (skip-gram), a BERT-style encoder (masked LM) and a
GPT-style decoder (causal LM) on the same data, tokenizer and token budget, the vectors of all
three d_model wide, the two transformers of one shape; then compared by llm_jax.probe.

    bash experiments/representation_probe/run.sh      # both steps below; 23 min on 2 busy CPU cores
    python -m llm_jax.sweep run experiments/representation_probe/sweep.py     # 3 runs, 22 min
    python -m llm_jax.probe --word2vec=runs/sweeps/representation_probe_cpu/word2vec \
        --bert=runs/sweeps/representation_probe_cpu/bert --gpt=runs/sweeps/representation_probe_cpu/gpt \
        --out=experiments/representation_probe/probe_cpu.json

`:scale=tpu` (or `gpu`) trains the same three at d_model 512, 8 layers (25M non-embedding
parameters), 512-token rows, in bfloat16; `:scale=smoke` is the tests' 3-step runs. The
tokenizer at every scale is the 2048-piece SentencePiece model next to this file, trained on the
stdlib's train split (4 min 40 s here) by

    python -m llm_jax.data.tokenizer train --dataset=stdlib --vocab_size=2048 \
        --output=experiments/representation_probe/spm_stdlib_2k

Each config keeps its own learning rate (word2vec's embeddings want a larger one).
"""
from llm_jax import sweep

TOKENIZER = "experiments/representation_probe/spm_stdlib_2k.model"
CONFIGS = {"word2vec": "configs/word2vec.py", "bert": "configs/bert_mlm.py", "gpt": "configs/quickstart.py"}
# (d_model, n_layers, n_heads) of BERT and GPT; word2vec's vectors are d_model wide.
SHAPES = {"smoke": (32, 2, 2), "cpu": (128, 4, 4), "tpu": (512, 8, 8)}
SHAPES["gpu"] = SHAPES["tpu"]
# Every run sees the same tokens: num_steps x batch_size x seq_len.
FIXED = {
    "smoke": {"train.num_steps": 3, "data.seq_len": 32, "data.batch_size": 8, "optimizer.warmup_steps": 1,
              "train.log_every": 1, "train.eval_every": 3, "train.eval_batches": 2, "train.checkpoint_every": 3},
    "cpu": {"train.num_steps": 1000, "data.seq_len": 128, "data.batch_size": 16,  # 2.0M tokens
            "optimizer.warmup_steps": 50, "train.eval_every": 250, "train.eval_batches": 16,
            "train.checkpoint_every": 250},
    # 131M tokens, ~11 passes over the stdlib's ~12M: more only repeats it (data.dataset=files
    # takes any other Python sources; the probe's labels need Python).
    "tpu": {"train.num_steps": 4000, "data.seq_len": 512, "data.batch_size": 64,
            "optimizer.warmup_steps": 500, "model.dtype": "bfloat16", "train.eval_every": 1000,
            "train.eval_batches": 32, "train.checkpoint_every": 1000},
}
FIXED["gpu"] = FIXED["tpu"]


def get_sweep(arg: str = ""):
    scale = sweep.scale_of(arg, SHAPES)
    d_model, n_layers, n_heads = SHAPES[scale]
    runs = [{"name": name, "config": config} for name, config in CONFIGS.items()]
    return dict(name=f"representation_probe_{scale}", config=CONFIGS["gpt"], runs=runs,
                fixed={"data.dataset": "stdlib", "data.tokenizer": "sentencepiece", "data.tokenizer_path": TOKENIZER,
                       "model.d_model": d_model, "model.n_layers": n_layers, "model.n_heads": n_heads,
                       "train.progress": False, **FIXED[scale]})
