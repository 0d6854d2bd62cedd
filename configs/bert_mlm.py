"""Pretrains a small BERT-style encoder with masked-LM on the Python standard library's sources.

    python -m llm_jax.main --config=configs/bert_mlm.py --workdir=runs/bert_mlm

About 5 minutes on 2 CPU cores. Arguments: `size=<model.SIZES row>`, `steps=<n>`.
"""
from llm_jax import config_lib


def get_config(arg: str | None = None):
    config = config_lib.base_config()
    config.task = "mlm"
    config.model.kind = "encoder"
    config.model.style = "bert"
    config.model.size = "tiny"
    config.data.dataset = "stdlib"
    config.data.seq_len = 128
    config.data.batch_size = 16
    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 50
    config.train.num_steps = 1200
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.eval_batches = 16
    config.train.checkpoint_every = 200
    return config_lib.apply_presets(config, arg, config_lib.COMMON_PRESETS)
