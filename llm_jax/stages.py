"""The whole recipe in one run: pretrain -> SFT -> annotate -> reward model -> DPO -> online DPO.

Each stage is an ordinary run of its own (its own config, in `workdir/<stage>`), started from the
previous stage's checkpoint with `train.init_from`, so any stage can be rerun or inspected alone.
A finished stage is skipped when the pipeline is restarted; an interrupted one resumes.

    annotate: the SFT policy samples K answers per prompt and the simulated annotator ranks them
              (InstructGPT's data collection), written as ranking JSONL for the reward model and DPO.

At the end each policy is evaluated on held-out prompts (greedy answers: gold accuracy and gold
reward; the reward model's score; KL to the SFT policy on temperature-1 samples) and the table is
printed and written to `workdir/summary.json`.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from llm_jax import config_lib, evaluation, metrics, online_dpo, train
from llm_jax.data import jsonl, tasks

def _stage_config(config, task: str, steps: int, learning_rate: float, **fields) -> ml_collections.ConfigDict:
    """A stage's own config: the pipeline's shared fields (model, data, mesh, ...) and its own."""
    stage = config_lib.base_config()
    shared = config.to_dict()
    shared.pop("pipeline")
    stage.update(ml_collections.ConfigDict(shared))
    stage.task = task
    stage.train.num_steps = steps
    stage.optimizer.learning_rate = learning_rate
    stage.optimizer.warmup_steps = min(stage.optimizer.warmup_steps, steps // 10)
    stage.train.eval_every = stage.train.checkpoint_every = steps
    return config_lib.set_fields(stage, fields)


def _run_stages(plan, dirs: dict[str, str], runner=None) -> None:
    """Runs each (stage, config) unless its final checkpoint exists; an interrupted stage resumes."""
    for stage, stage_config in plan:
        if os.path.isdir(os.path.join(dirs[stage], "checkpoints", str(stage_config.train.num_steps))):
            continue
        print(f"== {stage} ==", flush=True)
        (runner or train.run)(stage_config, dirs[stage])


def annotate(config, workdir: str, sft_dir: str) -> tuple[str, str]:
    """The SFT policy answers each prompt K times; the simulated rater ranks the answers."""
    p = config.pipeline
    paths = (os.path.join(workdir, "rankings_train.jsonl"), os.path.join(workdir, "rankings_eval.jsonl"))
    if all(os.path.exists(path) for path in paths):
        return paths
    exp, params = train.load_run(sft_dir)
    settings = evaluation.SamplingSettings(max_new_tokens=p.max_new_tokens, temperature=1.0,
                                           batch_size=p.sampling_batch_size)
    for split, path, n in (("train", paths[0], p.annotated_prompts), ("eval", paths[1], config.data.num_eval_examples)):
        prompts = [e.prompt for e in tasks.make_examples(_task_names(config), n, config.seed + 1, split=split)]
        repeated = [prompt for prompt in prompts for _ in range(p.samples_per_prompt)]
        samples, _ = evaluation.sample_responses(exp.model, params, exp.tokenizer, repeated, settings,
                                                 rng=jax.random.key(config.seed + (split == "eval")), mesh=exp.mesh)
        K = p.samples_per_prompt
        records = tasks.ranking_records(prompts, [samples[i * K:(i + 1) * K] for i in range(len(prompts))],
                                        noise=config.data.annotator_noise, seed=config.seed)
        os.makedirs(workdir, exist_ok=True)
        jsonl.write_jsonl(path, records)
        print(f"annotate: {len(records)} {split} prompts x {K} answers ranked; rater agreement with gold "
              f"{tasks.pairwise_agreement(records):.3f}", flush=True)
    return paths


def _task_names(config) -> list[str]:
    return [name.strip() for name in config.data.tasks.split(",") if name.strip()]


def evaluate_policies(config, stage_dirs: dict[str, str], reward_dir: str) -> list[dict]:
    """One row per policy plus the reward model's held-out accuracy.

    A policy is judged on its own distribution, as RLHF optimises it: `eval_samples` answers per
    held-out prompt at temperature 1 give the gold accuracy and mean gold reward, the reward
    model's mean score, the KL to the SFT policy (k1 estimator on these samples) and the win-rate
    against the SFT policy's samples (gold reward, ties half); greedy accuracy is reported too.
    """
    p = config.pipeline
    prompts = [e.prompt for e in tasks.make_examples(_task_names(config), config.data.num_eval_examples,
                                                     config.seed + 2, split="eval")] * p.eval_samples
    sft_exp, sft_params = train.load_run(stage_dirs["sft"])
    rm_exp, rm_params = train.load_run(reward_dir)
    greedy = evaluation.SamplingSettings(max_new_tokens=p.max_new_tokens, greedy=True,
                                         batch_size=p.sampling_batch_size)
    sampled = evaluation.SamplingSettings(max_new_tokens=p.max_new_tokens, temperature=1.0,
                                          batch_size=p.sampling_batch_size)
    seq_len = config.data.seq_len
    rows, rewards = [], {}
    for stage in stage_dirs:  # sft first: the others are compared with it
        exp, params = train.load_run(stage_dirs[stage])
        samples, _ = evaluation.sample_responses(exp.model, params, exp.tokenizer, prompts, sampled,
                                                 rng=jax.random.key(1), mesh=exp.mesh)
        greedy_answers, _ = evaluation.sample_responses(exp.model, params, exp.tokenizer, prompts, greedy,
                                                        rng=jax.random.key(0), mesh=exp.mesh)
        kl = np.mean(evaluation.score_logps(exp.model, params, exp.tokenizer, prompts, samples, seq_len=seq_len)
                     - evaluation.score_logps(sft_exp.model, sft_params, exp.tokenizer, prompts, samples,
                                              seq_len=seq_len))
        rm_scores = evaluation.score_rewards(rm_exp.model, rm_params, rm_exp.tokenizer, prompts, samples,
                                             seq_len=rm_exp.config.data.seq_len)
        rewards[stage] = [tasks.gold_reward(q, a) for q, a in zip(prompts, samples)]
        rows.append({"stage": stage, **evaluation.gold_scores(prompts, samples), "rm_accuracy": None,
                     "kl": float(kl), "rm_score": float(np.mean(rm_scores)),
                     "greedy_accuracy": evaluation.gold_scores(prompts, greedy_answers)["gold_accuracy"],
                     "win_rate_vs_sft": evaluation.win_rate(rewards[stage], rewards.get("sft", rewards[stage]))})
    rm_metrics = [r for r in metrics.read_metrics(os.path.join(reward_dir, "metrics.jsonl")) if "eval/accuracy" in r]
    rows.insert(1, {"stage": "reward_model", "gold_accuracy": None, "gold_reward": None,
                    "rm_accuracy": rm_metrics[-1]["eval/accuracy"], "kl": None})
    return rows


def format_table(rows: list[dict]) -> str:
    columns = ("stage", "gold_accuracy", "gold_reward", "rm_accuracy", "kl", "rm_score", "greedy_accuracy",
               "win_rate_vs_sft")
    lines = ["  ".join(f"{c:>15}" for c in columns)]
    for row in rows:
        cells = [row.get(c) for c in columns]
        lines.append("  ".join(f"{c:>15}" if isinstance(c, str) else ("{:>15}".format("-") if c is None
                                                                        else f"{c:>15.4f}") for c in cells))
    return "\n".join(lines)


def run(config, workdir: str) -> list[dict]:
    p = config.pipeline
    scorers = [name.strip() for name in p.online_scorers.split(",") if name.strip()]
    online_stages = [f"online_dpo_{scorer}" for scorer in scorers]
    dirs = {stage: os.path.join(workdir, stage)
            for stage in ("pretrain", "sft", "annotate", "reward", "dpo", *online_stages)}
    plan = [
        ("pretrain", _stage_config(config, "lm", p.pretrain_steps, p.pretrain_learning_rate,
                                   **{"data.dataset": p.pretrain_dataset})),
        ("sft", _stage_config(config, "sft", p.sft_steps, p.sft_learning_rate,
                              **{"train.init_from": dirs["pretrain"]})),
    ]
    _run_stages(plan, dirs)
    train_file, eval_file = annotate(config, dirs["annotate"], dirs["sft"])
    preference_data = {"data.train_file": train_file, "data.eval_file": eval_file,
                       "data.max_responses": p.samples_per_prompt}
    plan = [
        ("reward", _stage_config(config, "reward", p.reward_steps, p.reward_learning_rate,
                                 **{"train.init_from": dirs["sft"], "data.batch_size": p.reward_batch_size,
                                    **preference_data})),
        ("dpo", _stage_config(config, "dpo", p.dpo_steps, p.dpo_learning_rate,
                              **{"train.init_from": dirs["sft"], "data.batch_size": p.dpo_batch_size,
                                 **preference_data})),
    ]
    _run_stages(plan, dirs)
    # One online DPO run per scorer, all from the SFT policy: the gold oracle, and the reward model
    # (whose mistakes a policy learns to exploit when optimised against it for long).
    plan = [(stage, _stage_config(config, "online_dpo", p.online_iterations * config.online_dpo.steps_per_iteration,
                                  p.online_learning_rate,
                                  **{"train.init_from": dirs["sft"], "data.batch_size": p.dpo_batch_size,
                                     "online_dpo.scorer": scorer, "online_dpo.reward_model_from": dirs["reward"]}))
            for stage, scorer in zip(online_stages, scorers)]
    _run_stages(plan, dirs, runner=online_dpo.run)

    policy_dirs = {stage: dirs[stage] for stage in ("sft", "dpo", *online_stages)}
    rows = evaluate_policies(config, policy_dirs, dirs["reward"])
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(format_table(rows), flush=True)
    return rows
