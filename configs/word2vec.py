"""Trains word2vec's skip-gram (llm_jax/word2vec.py) on the Python standard library's sources:
one input and one output vector per token, each token predicting its neighbours.

    python -m llm_jax.main --config=configs/word2vec.py --workdir=runs/word2vec

About 2 minutes on 2 CPU cores. Bytes make poor "words", so the tokenizer is the 2048-piece
SentencePiece vocabulary of experiments/representation_probe (trained on the stdlib by
`python -m llm_jax.data.tokenizer train --dataset=stdlib --vocab_size=2048 --output=...`).
Arguments: `size=<model.SIZES row>` (only its d_model counts), `steps=<n>`, `window=<n>`.
"""
from llm_jax import config_lib

TOKENIZER = "experiments/representation_probe/spm_stdlib_2k.model"


def set_window(config, window: str) -> None:
    config.word2vec.window = int(window)


def get_config(arg: str | None = None):
    config = config_lib.base_config()
    config.task = "skipgram"
    config.model.kind = "word2vec"
    config.model.size = "tiny"  # d_model 128
    config.word2vec.window = 5
    config.data.dataset = "stdlib"
    config.data.tokenizer = "sentencepiece"
    config.data.tokenizer_path = TOKENIZER
    config.data.seq_len = 128
    config.data.batch_size = 16
    config.optimizer.learning_rate = 1e-2
    config.optimizer.warmup_steps = 50
    config.train.num_steps = 1000
    config.train.log_every = 10
    config.train.eval_every = 200
    config.train.eval_batches = 16
    config.train.checkpoint_every = 200
    return config_lib.apply_presets(config, arg, {**config_lib.COMMON_PRESETS, "window": set_window})
