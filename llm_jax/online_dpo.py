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

Resume is exact, inside an iteration too: a checkpoint holds the state, the iteration's work in
flight (its pairs, their reference log-probs, the metrics sampling measured, the steps done) and,
with reference updates, the current reference. SIGTERM / SIGINT stop the loop after the running
DPO step, or after the sampling phase, with a checkpoint of that step (preemption.Preempted).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llm_jax import checkpoint, config_lib, evaluation, metrics, preemption, recipes, sharding, steps, train
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


# Checkpoint items: the train state; "online", the loop's position and the work in flight
# (IterationWork, JSON); "reference", the DPO reference, once reference updates may have moved it.
CHECKPOINT_ITEMS = ("state", "online", "reference")


@dataclasses.dataclass
class IterationWork:
    """One iteration's sampled work: its pairs, their reference log-probs and what sampling
    measured. A checkpoint taken inside the iteration carries it, so a resume finishes the
    iteration on the same pairs: sampling again from the policy, which has trained since, would
    give other pairs (and cost the sampling twice)."""

    pairs: list[jsonl.PreferenceExample]
    reference_logps: np.ndarray | None  # float32 [num_pairs, 2]; None when no pair was built
    scalars: dict[str, float]  # the online/* metrics measured while sampling
    steps_done: int = 0
    train_seconds: float = 0.0  # caching the reference log-probs and the steps done so far

    def to_json(self) -> dict:
        # JSON writes Python floats exactly (shortest round-tripping repr) and float32 -> float64 is
        # exact, so the table comes back bit for bit and the resumed losses match.
        table = None if self.reference_logps is None else [[float(x) for x in row] for row in self.reference_logps]
        return {"pairs": [[p.prompt, p.chosen, p.rejected] for p in self.pairs], "reference_logps": table,
                "scalars": self.scalars, "steps_done": self.steps_done, "train_seconds": self.train_seconds}

    @classmethod
    def from_json(cls, saved: dict) -> IterationWork:
        table = saved["reference_logps"]
        return cls(pairs=[jsonl.PreferenceExample(*pair) for pair in saved["pairs"]],
                   reference_logps=None if table is None else np.asarray(table, np.float32),
                   scalars=dict(saved["scalars"]), steps_done=saved["steps_done"],
                   train_seconds=saved["train_seconds"])


def _restore_args(abstract_params) -> dict:
    """The extra items to restore; `checkpoint.restore_latest` leaves out those a step lacks (runs
    without reference updates save no "reference"; checkpoints written before these items have
    neither)."""
    return {"online": ocp.args.JsonRestore(), "reference": ocp.args.StandardRestore(abstract_params)}


def _work_in_flight(saved: dict | None, step: int, steps_per_iteration: int) -> IterationWork | None:
    """The restored iteration's unfinished work, checked against the step it was saved at."""
    if saved is None or saved["work"] is None:
        if step % steps_per_iteration:
            raise ValueError(f"checkpoint {step} is inside an iteration but holds none of its pairs; "
                             f"resume from a checkpoint at an iteration end")
        return None
    work = IterationWork.from_json(saved["work"])
    if saved["iteration"] != step // steps_per_iteration or work.steps_done != step % steps_per_iteration:
        raise ValueError(f"checkpoint {step}: its online item says iteration {saved['iteration']}, "
                         f"{work.steps_done} steps done, which is not step {step}")
    return work


def restore_or_init(config, exp, manager, abstract_state, init_state):
    """(state, reference, work in flight or None, step restored or None): the workdir's newest
    usable checkpoint with its reference and unfinished iteration, or a fresh start from
    `train.init_from` with the SFT reference."""
    with sharding.mesh_context(exp.mesh):
        step, items = checkpoint.restore_latest(manager, abstract_state, None,
                                                extra_args=_restore_args(abstract_state.params))
        if step is not None:
            state = items["state"]
        else:
            items, state = {}, init_state()
            if config.train.init_from:
                state = state.replace(params=train.params_from(config.train.init_from, state.params,
                                                               abstract_state.params))
    reference = items.get("reference")
    if reference is None:  # never moved (no reference updates) or a fresh start: the SFT model
        reference = recipes.reference_params(config, abstract_state.params)
    work = None if step is None else _work_in_flight(items.get("online"), step,
                                                     config.online_dpo.steps_per_iteration)
    return state, reference, work, step


@dataclasses.dataclass
class _Loop:
    """What every iteration uses: sampling, training and saving, for `run` to sequence."""

    config: object
    exp: train.Experiment
    scorer: Scorer
    prompts: list[str]
    train_step: object
    reference_logps_fn: object
    manager: object

    def sample(self, iteration: int, params, reference) -> IterationWork:
        """K samples per prompt -> scores -> pairs, and the pairs' reference log-probs."""
        config, odpo, exp = self.config, self.config.online_dpo, self.exp
        rng = np.random.default_rng([config.seed, iteration])
        chosen = [self.prompts[i] for i in rng.choice(len(self.prompts), odpo.prompts_per_iteration, replace=False)]
        repeated = [p for p in chosen for _ in range(odpo.samples_per_prompt)]
        settings = evaluation.SamplingSettings(max_new_tokens=odpo.max_new_tokens, temperature=odpo.temperature,
                                               batch_size=len(repeated))
        started = time.perf_counter()
        samples, _ = evaluation.sample_responses(exp.model, params, exp.tokenizer, repeated, settings,
                                                 rng=jax.random.key(config.seed * 100_003 + iteration), mesh=exp.mesh)
        proxy = self.scorer(repeated, samples)
        gold = evaluation.gold_scores(repeated, samples)
        policy_logps = evaluation.score_logps(exp.model, params, exp.tokenizer, repeated, samples,
                                              seq_len=config.data.seq_len)
        reference_logps = evaluation.score_logps(exp.model, reference, exp.tokenizer, repeated, samples,
                                                 seq_len=config.data.seq_len)
        K = odpo.samples_per_prompt
        pairs = build_pairs(chosen, [samples[i * K:(i + 1) * K] for i in range(len(chosen))],
                            [proxy[i * K:(i + 1) * K] for i in range(len(chosen))], pairs=odpo.pairs)
        sampled = time.perf_counter()
        table = recipes.cache_reference_logps(self.reference_logps_fn, reference, pairs, exp.tokenizer,
                                              config=config, mesh=exp.mesh) if pairs else None
        scalars = {"online/proxy_reward": float(np.mean(proxy)), "online/gold_reward": gold["gold_reward"],
                   "online/gold_accuracy": gold["gold_accuracy"],
                   "online/kl": float(np.mean(policy_logps - reference_logps)), "online/pairs": len(pairs),
                   "online/sample_seconds": sampled - started}
        return IterationWork(pairs, table, scalars, train_seconds=time.perf_counter() - sampled)

    def train(self, iteration: int, work: IterationWork, state, signals):
        """The iteration's remaining DPO steps on its pairs. Returns (state, metrics of its last
        step, the stop signal's name or None): a stop agreed between two steps ends it early."""
        config, steps_per_iteration = self.config, self.config.online_dpo.steps_per_iteration
        started = time.perf_counter()
        if not work.pairs:  # no informative pair: the iteration's steps are skipped, the step count kept aligned
            state = state.replace(step=state.step + steps_per_iteration - work.steps_done)
            work.steps_done = steps_per_iteration
            return state, {}, None
        batches, _ = post_training.preference_batches(
            work.pairs, self.exp.tokenizer, seq_len=config.data.seq_len, batch_size=config.data.batch_size,
            seed=config.seed + iteration, truncation=config.data.truncation, reference_logps=work.reference_logps,
            process_index=jax.process_index(), process_count=jax.process_count())
        for _ in range(work.steps_done):  # the batches the steps before a restart used
            next(batches)
        stop = None
        with sharding.mesh_context(self.exp.mesh):
            while work.steps_done < steps_per_iteration and stop is None:
                batch = sharding.shard_host_batch(next(batches), sharding.batch_sharding(self.exp.mesh))
                state, step_metrics = self.train_step(state, batch)
                work.steps_done += 1
                # Every process runs every step, so each may agree here (one all-gather per step:
                # little next to a step, and online DPO runs few steps per iteration). After the
                # last step the iteration ends first, and `run` asks there.
                if work.steps_done < steps_per_iteration:
                    stop = signals.agreed(jax.process_count())
        scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        work.train_seconds += time.perf_counter() - started
        return state, scalars, stop

    def save(self, step: int, state, reference, work: IterationWork | None) -> None:
        """Checkpoint `step`: the state, the iteration it is in and its work in flight (None at an
        iteration end), and the reference when reference updates can have moved it."""
        online = {"iteration": step // self.config.online_dpo.steps_per_iteration,
                  "work": None if work is None else work.to_json()}
        extra_args = {"online": ocp.args.JsonSave(online)}
        if self.config.online_dpo.reference_update_every:
            extra_args["reference"] = ocp.args.StandardSave(reference)
        checkpoint.save(self.manager, step, state, None, extra_args=extra_args)

    def stop(self, signal_name: str, state, reference, work: IterationWork | None) -> preemption.Preempted:
        """Saves the current step (with the work in flight) unless a checkpoint of it exists, e.g.
        the one this iteration started from: Orbax cannot overwrite a step, and resuming from it
        samples the iteration again, from the same parameters and seed."""
        step = int(jax.device_get(state.step))
        if step not in self.manager.all_steps():
            self.save(step, state, reference, work)
        return preemption.Preempted(step, signal_name)


def run(config, workdir: str) -> dict[str, float]:
    """Runs the online DPO iterations until `train.num_steps`, resuming from `workdir`'s newest
    checkpoint, inside an iteration too. A stop signal (SIGTERM, SIGINT) saves the current step
    and raises preemption.Preempted. Returns the last iteration's metrics."""
    train.maybe_initialize_distributed(config.distributed)
    odpo = config.online_dpo
    if config.train.num_steps % odpo.steps_per_iteration:
        raise ValueError(f"train.num_steps ({config.train.num_steps}) must be a multiple of "
                         f"online_dpo.steps_per_iteration ({odpo.steps_per_iteration})")
    exp = train.build_experiment(config)
    is_primary = jax.process_index() == 0
    config_lib.check_or_write_workdir_config(config, workdir, write=is_primary)
    train.check_vocabularies(config, exp.tokenizer, workdir, write=is_primary)
    abstract_state, state_shardings, init_state = train.state_shardings_and_init(exp, config.seed)
    # Each iteration's pairs are scored by the reference once, right after they are built, so the
    # reference is always cached here (dpo.reference only matters for offline DPO).
    settings = dataclasses.replace(recipes.dpo_settings(config), cached_reference=True)
    train_step = jax.jit(steps.make_dpo_train_step(exp.model, exp.tx, exp.schedule, settings),
                         in_shardings=(state_shardings, {key: sharding.batch_sharding(exp.mesh) for key in
                                                         ("tokens", "mask", "loss_mask", "valid", "reference_logps")}),
                         out_shardings=(state_shardings, sharding.replicated(exp.mesh)), donate_argnums=(0,))
    reference_logps_fn = recipes.jit_reference_logps(exp.model, exp.mesh, state_shardings.params)

    manager = checkpoint.make_manager(workdir, keep=config.train.keep_checkpoints, items=CHECKPOINT_ITEMS)
    state, reference, work, latest = restore_or_init(config, exp, manager, abstract_state, init_state)
    prompts = [e.prompt for e in recipes.task_examples(config.data, "train", config.seed)]
    loop = _Loop(config, exp, Scorer(config), prompts, train_step, reference_logps_fn, manager)
    # An iteration logs one line, at its last step: a resume inside it drops nothing of it and
    # writes it once, when the iteration ends.
    writer = metrics.MetricsWriter(workdir, enabled=is_primary, resume_step=-1 if latest is None else latest)
    iterations = config.train.num_steps // odpo.steps_per_iteration
    start_iteration = int(jax.device_get(state.step)) // odpo.steps_per_iteration
    last, preempted = {}, None
    with preemption.StopSignals() as signals:
        for iteration in range(start_iteration, iterations):
            if work is None:  # else a resume inside this iteration: its pairs are restored
                work = loop.sample(iteration, state.params, reference)
                # Sampling is most of an iteration: a signal that came during it is honoured now.
                if stop := signals.agreed(jax.process_count()):
                    preempted = loop.stop(stop, state, reference, work)
                    break
            state, train_scalars, stop = loop.train(iteration, work, state, signals)
            if train_scalars:  # never save (or go on from) a state whose last step was not finite
                train.check_finite(int(jax.device_get(state.step)), train_scalars,
                                   config.optimizer.skip_nonfinite_steps)
            if stop:
                preempted = loop.stop(stop, state, reference, work)
                break
            step = (iteration + 1) * odpo.steps_per_iteration
            scalars = {**train_scalars, "online/iteration": iteration + 1, **work.scalars,
                       "online/train_seconds": work.train_seconds}
            writer.write(step, scalars)
            last.update(scalars)
            if is_primary:
                print(f"iteration {iteration + 1}/{iterations}: proxy reward {scalars['online/proxy_reward']:.3f}, "
                      f"gold reward {scalars['online/gold_reward']:.3f}, KL {scalars['online/kl']:.3f}, "
                      f"{len(work.pairs)} pairs, sampling {scalars['online/sample_seconds']:.1f}s, "
                      f"training {work.train_seconds:.1f}s", flush=True)
            work = None
            if odpo.reference_update_every and (iteration + 1) % odpo.reference_update_every == 0:
                reference = jax.tree.map(jnp.copy, state.params)  # the policy becomes the new anchor
            if step % config.train.checkpoint_every == 0 or iteration + 1 == iterations:
                loop.save(step, state, reference, None)
            if iteration + 1 < iterations and (stop := signals.agreed(jax.process_count())):
                preempted = loop.stop(stop, state, reference, None)
                break
    writer.close()
    manager.close()
    if preempted is not None:
        raise preempted
    return last
