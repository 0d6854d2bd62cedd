"""Pretrains a small GPT-2-style decoder on the Python standard library's source files.

    python -m llm_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

About 5 minutes on 2 CPU cores. Arguments: `size=<model.SIZES row>` (e.g.
`configs/quickstart.py:size=nano` for a smoke run), `steps=<n>`.
"""
from llm_jax import config_lib


def get_config(arg: str | None = None):
    config = config_lib.base_config()
    config.task = "lm"
    config.model.kind = "decoder"
    config.model.style = "gpt2"
    config.model.size = "tiny"
    config.data.dataset = "stdlib"
    config.data.seq_len = 128
    config.data.batch_size = 16
    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 50
    config.optimizer.weight_decay = 0.1
    config.train.num_steps = 800
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.eval_batches = 16
    config.train.checkpoint_every = 200
    return config_lib.apply_presets(config, arg, config_lib.COMMON_PRESETS)
