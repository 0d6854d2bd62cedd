"""Post-trains a model from another workdir with that workdir's architecture and tokenizer: a
Hugging Face checkpoint imported by `llm_jax.convert`, or any training run.

    python -m llm_jax.convert import --hf_dir=/path/to/hf_model --workdir=runs/hf
    python -m llm_jax.main --config=configs/finetune.py:init_from=runs/hf,task=sft --workdir=runs/hf_sft

Arguments: `init_from=<workdir>` (required), `task=sft|reward|dpo|lm|mlm` (default sft;
DPO's reference is the init_from model), `steps=<n>`. The data are the embedded verifiable tasks,
or JSONL files (`--config.data.train_file=...`, see README); `lm` and `mlm` read `data.dataset`.
"""
from llm_jax import config_lib, train


def set_init_from(config, workdir: str) -> None:
    """The source run's model and tokenizer (its config.json), and its newest checkpoint's weights."""
    source = train.load_config(workdir)
    config.model = source.model
    config.data.tokenizer = source.data.tokenizer
    config.data.tokenizer_path = source.data.tokenizer_path
    config.data.seq_len = min(config.data.seq_len, source.data.seq_len)
    config.train.init_from = workdir


def set_task(config, task: str) -> None:
    config.task = task


def get_config(arg: str | None = None):
    if "init_from=" not in (arg or ""):
        raise ValueError("configs/finetune.py needs init_from=<workdir>, e.g. configs/finetune.py:init_from=runs/hf")
    config = config_lib.base_config()
    config.task = "sft"
    config.data.seq_len = 256
    config.data.batch_size = 16
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 20
    config.train.num_steps = 500
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.checkpoint_every = 100
    return config_lib.apply_presets(config, arg, {"init_from": set_init_from, "task": set_task,
                                                  "steps": config_lib.set_steps})
