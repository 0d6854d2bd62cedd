"""Online DPO: the policy samples, a scorer ranks, the ranks become fresh pairs, DPO trains, repeat.

    for each iteration:
        K samples per prompt from the current policy             (sampling.py, KV cache)
        scores from the reward model, or the gold oracle          (online_dpo.scorer)
        pairs: best vs worst of each prompt, or every pair whose scores differ
        reference log-probs of the pairs, once                    (the frozen SFT model)
        `online_dpo.steps_per_iteration` DPO steps on them        (steps.make_dpo_train_step)
        log proxy and gold reward, KL to the reference on the policy's own samples, pairs built,
        seconds spent sampling and training

`train.num_steps` counts DPO steps (iterations x steps_per_iteration), so the learning-rate
schedule, logging and checkpoints work as in every other run.
    python -m llm_jax.main --config=configs/online_dpo.py --workdir=runs/online_dpo
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import checkpoint, config_lib, evaluation, metrics, recipes, sharding, steps, train
from llm_jax.data import jsonl, post_training, tasks


def build_pairs(prompts, responses_per_prompt, scores_per_prompt, *, pairs: str) -> list[jsonl.PreferenceExample]:
    """Preference pairs from scored samples: the best against the worst answer of each prompt
    ('best_worst'), or every pair of answers whose scores differ ('all'); equal scores say nothing."""
    out = []
    for prompt, responses, scores in zip(prompts, responses_per_prompt, scores_per_prompt):
        order = np.argsort(-np.asarray(scores), kind="stable")
        if pairs == "best_worst":
            candidates = [(order[0], order[-1])]
        else:
            candidates = [(i, j) for a, i in enumerate(order) for j in order[a + 1:]]
        out += [jsonl.PreferenceExample(prompt, responses[i], responses[j]) for i, j in candidates
                if scores[i] > scores[j] and responses[i] != responses[j]]
    return out


class Scorer:
    """The proxy reward of online DPO: a trained reward model, or the gold oracle itself."""

    def __init__(self, config):
        self.kind = config.online_dpo.scorer
        if self.kind == "reward_model":
            if not config.online_dpo.reward_model_from:
                raise ValueError("online_dpo.reward_model_from must name the reward model's workdir "
                                 "(or set online_dpo.scorer='gold')")
            # The reward model's own run: its config, architecture and newest weights.
            self.exp, self.params = train.load_run(config.online_dpo.reward_model_from)
            self.seq_len = self.exp.config.data.seq_len
        elif self.kind != "gold":
            raise ValueError(f"online_dpo.scorer must be 'reward_model' or 'gold', got {self.kind!r}")

    def __call__(self, prompts, responses) -> np.ndarray:
        if self.kind == "gold":
            return np.asarray([tasks.gold_reward(p, r) for p, r in zip(prompts, responses)], np.float32)
        return evaluation.score_rewards(self.exp.model, self.params, self.exp.tokenizer, prompts, responses,
                                        seq_len=self.seq_len)


def run(config, workdir: str) -> dict[str, float]:
    train.maybe_initialize_distributed(config.distributed)
    odpo = config.online_dpo
    if config.train.num_steps % odpo.steps_per_iteration:
        raise ValueError(f"train.num_steps ({config.train.num_steps}) must be a multiple of "
                         f"online_dpo.steps_per_iteration ({odpo.steps_per_iteration})")
    exp = train.build_experiment(config)
    is_primary = jax.process_index() == 0
    config_lib.check_or_write_workdir_config(config, workdir, write=is_primary)
    abstract_state, state_shardings, init_state = train.state_shardings_and_init(exp, config.seed)
    # Each iteration's pairs are scored by the reference once, right after they are built, so the
    # reference is always cached here (dpo.reference only matters for offline DPO).
    settings = dataclasses.replace(recipes.dpo_settings(config), cached_reference=True)
    train_step = jax.jit(steps.make_dpo_train_step(exp.model, exp.tx, exp.schedule, settings),
                         in_shardings=(state_shardings, {key: sharding.batch_sharding(exp.mesh) for key in
                                                         ("tokens", "mask", "loss_mask", "valid", "reference_logps")}),
                         out_shardings=(state_shardings, sharding.replicated(exp.mesh)), donate_argnums=(0,))
    reference_logps_fn = recipes.jit_reference_logps(exp.model, exp.mesh, state_shardings.params)

    manager = checkpoint.make_manager(workdir, keep=config.train.keep_checkpoints)
    latest = manager.latest_step()
    with sharding.mesh_context(exp.mesh):
        if latest is not None:
            state = checkpoint.restore(manager, latest, abstract_state, None)
        else:
            state = init_state()
            if config.train.init_from:
                state = state.replace(params=train.params_from(config.train.init_from, state.params,
                                                               abstract_state.params))
    reference = recipes.reference_params(config, abstract_state.params)
    scorer = Scorer(config)
    prompts = [e.prompt for e in recipes.task_examples(config.data, "train", config.seed)]
    sampling_settings = evaluation.SamplingSettings(max_new_tokens=odpo.max_new_tokens, temperature=odpo.temperature,
                                                    batch_size=odpo.prompts_per_iteration * odpo.samples_per_prompt)
    writer = metrics.MetricsWriter(workdir, enabled=is_primary, resume_step=latest)
    iterations = config.train.num_steps // odpo.steps_per_iteration
    start_iteration = int(jax.device_get(state.step)) // odpo.steps_per_iteration
    last = {}
    for iteration in range(start_iteration, iterations):
        rng = np.random.default_rng([config.seed, iteration])
        chosen = [prompts[i] for i in rng.choice(len(prompts), odpo.prompts_per_iteration, replace=False)]
        repeated = [p for p in chosen for _ in range(odpo.samples_per_prompt)]

        started = time.perf_counter()
        samples, _ = evaluation.sample_responses(exp.model, state.params, exp.tokenizer, repeated, sampling_settings,
                                                 rng=jax.random.key(config.seed * 100_003 + iteration), mesh=exp.mesh)
        proxy = scorer(repeated, samples)
        gold = evaluation.gold_scores(repeated, samples)
        policy_logps = evaluation.score_logps(exp.model, state.params, exp.tokenizer, repeated, samples,
                                              seq_len=config.data.seq_len)
        reference_logps = evaluation.score_logps(exp.model, reference, exp.tokenizer, repeated, samples,
                                                 seq_len=config.data.seq_len)
        K = odpo.samples_per_prompt
        pairs = build_pairs(chosen, [samples[i * K:(i + 1) * K] for i in range(len(chosen))],
                            [proxy[i * K:(i + 1) * K] for i in range(len(chosen))], pairs=odpo.pairs)
        sampled = time.perf_counter()

        scalars = {}
        if pairs:
            table = recipes.cache_reference_logps(reference_logps_fn, reference, pairs, exp.tokenizer,
                                                  config=config, mesh=exp.mesh)
            batches, _ = post_training.preference_batches(
                pairs, exp.tokenizer, seq_len=config.data.seq_len, batch_size=config.data.batch_size,
                seed=config.seed + iteration, truncation=config.data.truncation, reference_logps=table,
                process_index=jax.process_index(), process_count=jax.process_count())
            with sharding.mesh_context(exp.mesh):
                for _ in range(odpo.steps_per_iteration):
                    batch = sharding.shard_host_batch(next(batches), sharding.batch_sharding(exp.mesh))
                    state, step_metrics = train_step(state, batch)
            scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        else:  # no informative pair: the iteration's steps are skipped, the step count kept aligned
            state = state.replace(step=state.step + odpo.steps_per_iteration)
        trained = time.perf_counter()

        step = (iteration + 1) * odpo.steps_per_iteration
        scalars.update({"online/iteration": iteration + 1, "online/proxy_reward": float(np.mean(proxy)),
                        "online/gold_reward": gold["gold_reward"], "online/gold_accuracy": gold["gold_accuracy"],
                        "online/kl": float(np.mean(policy_logps - reference_logps)), "online/pairs": len(pairs),
                        "online/sample_seconds": sampled - started, "online/train_seconds": trained - sampled})
        writer.write(step, scalars)
        last.update(scalars)
        if is_primary:
            print(f"iteration {iteration + 1}/{iterations}: proxy reward {scalars['online/proxy_reward']:.3f}, "
                  f"gold reward {gold['gold_reward']:.3f}, KL {scalars['online/kl']:.3f}, {len(pairs)} pairs, "
                  f"sampling {sampled - started:.1f}s, training {trained - sampled:.1f}s", flush=True)
        if odpo.reference_update_every and (iteration + 1) % odpo.reference_update_every == 0:
            reference = jax.tree.map(jnp.copy, state.params)  # the policy becomes the new anchor
        if step % config.train.checkpoint_every == 0 or iteration + 1 == iterations:
            checkpoint.save(manager, step, state, None)
    writer.close()
    manager.close()
    return last
