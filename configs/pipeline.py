"""The whole recipe on the embedded verifiable tasks: pretrain -> SFT -> annotate -> reward model
-> DPO -> online DPO, each stage in its own subfolder, with a summary table at the end.

    python -m llm_jax.main --config=configs/pipeline.py --workdir=runs/pipeline

About 9 minutes on 2 CPU cores. Stage lengths are `config.pipeline.*`; `size=` changes the model
for every stage (e.g. `configs/pipeline.py:size=small` on an accelerator).
"""
import ml_collections

from llm_jax import config_lib


def get_config(arg: str | None = None):
    config = config_lib.base_config()
    config.task = "pipeline"
    config.model.size = "tiny"
    config.model.style = "gpt2"
    config.data.seq_len = 64
    config.data.batch_size = 32
    # Tasks the 0.8M-parameter model half-solves after SFT: room to improve, and a reward model
    # that learns to judge them (it cannot judge `add` or `reverse` at this size).
    config.data.tasks = "count,sort"
    config.data.num_examples = 20_000
    config.data.num_eval_examples = 256
    config.data.annotator_noise = 0.1  # raters agree with the gold order on ~96% of informative pairs
    config.optimizer.warmup_steps = 50
    config.train.log_every = 25
    config.train.eval_batches = 8
    config.train.keep_checkpoints = 1
    config.dpo.beta = 0.5
    config.online_dpo.prompts_per_iteration = 64
    config.online_dpo.samples_per_prompt = 4
    config.online_dpo.steps_per_iteration = 8
    config.online_dpo.max_new_tokens = 24

    config.pipeline = p = ml_collections.ConfigDict()
    p.pretrain_dataset = "stdlib"
    p.pretrain_steps = 300
    p.pretrain_learning_rate = 3e-3
    p.sft_steps = 600
    p.sft_learning_rate = 1e-3
    p.annotated_prompts = 2048  # prompts the SFT policy answers K times for the annotators
    p.samples_per_prompt = 4
    p.max_new_tokens = 24
    p.sampling_batch_size = 256
    p.reward_steps = 300
    p.reward_batch_size = 8  # prompts per step, each with samples_per_prompt ranked answers
    p.reward_learning_rate = 1e-3
    p.dpo_steps = 150
    p.dpo_batch_size = 16  # pairs per step
    p.dpo_learning_rate = 5e-5
    p.online_iterations = 15
    p.online_learning_rate = 5e-5
    # One online DPO run per scorer: the gold oracle, and the reward model trained above.
    p.online_scorers = "gold,reward_model"
    p.eval_samples = 4  # temperature-1 answers per held-out prompt for the summary table
    return config_lib.apply_presets(config, arg, {"size": config_lib.set_size})
