"""Train and eval steps, one pair per task, each a pure function jitted once by the loop.

A task is a way of turning a data batch into (model inputs, targets, weights); the rest — forward,
cross-entropy, gradient accumulation, the optimizer update — is shared:

    train_step(state, batch) -> (state, metrics)
    eval_step(params, batch) -> sums (loss_sum, weight_sum, ...) to add up over the eval set

The step's randomness (dropout, MLM masking) comes from `fold_in(state.rng, state.step)`, so a
resumed run draws exactly what the uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from llm_jax import objectives, word2vec


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """What the MLM masking rule needs to know about the tokenizer."""

    vocab_size: int  # the tokenizer's own size (random replacements stay inside it)
    mask_id: int
    num_special: int


def lm_task(batch, rng, token_info: TokenInfo):
    """Causal LM: the logits at position t predict tokens[t + 1]; the last position predicts
    nothing and padding never counts."""
    del rng, token_info
    tokens_BxL, mask_BxL = batch["tokens"], batch["mask"]
    return dict(tokens_BxL=tokens_BxL, mask_BxL=mask_BxL), *shifted_targets(tokens_BxL, mask_BxL)


def sft_task(batch, rng, token_info: TokenInfo):
    """Instruction tuning: the causal LM loss on response tokens only. `loss_mask[t]` marks
    tokens[t] as a target, which the logits at t - 1 predict; packed rows carry segment ids and
    positions restarting per example, so examples never see each other."""
    del rng, token_info
    tokens_BxL, loss_mask_BxL = batch["tokens"], batch["loss_mask"]
    inputs = dict(tokens_BxL=tokens_BxL, mask_BxL=batch["mask"])
    if "segment_ids" in batch:
        inputs.update(segment_ids_BxL=batch["segment_ids"], positions_BxL=batch["positions"])
    return inputs, *shifted_targets(tokens_BxL, loss_mask_BxL)


def shifted_targets(tokens_BxL, target_mask_BxL):
    """(targets, weights) aligned with the logits: position t predicts tokens[t + 1], weighted by
    whether tokens[t + 1] is a target; the last position predicts nothing."""
    targets_BxL = jnp.roll(tokens_BxL, -1, axis=-1)
    weights_BxL = jnp.concatenate([target_mask_BxL[..., 1:], jnp.zeros_like(target_mask_BxL[..., :1])], axis=-1)
    return targets_BxL, weights_BxL


def mlm_task(batch, rng, token_info: TokenInfo):
    """Masked LM: BERT's 15% / 80-10-10 rule, the loss on the selected positions only."""
    tokens_BxL, mask_BxL = batch["tokens"], batch["mask"]
    inputs_BxL, weights_BxL = objectives.mlm_mask_tokens(
        rng, tokens_BxL, mask_BxL, mask_id=token_info.mask_id,
        vocab_size=token_info.vocab_size, num_special=token_info.num_special)
    return dict(tokens_BxL=inputs_BxL, mask_BxL=mask_BxL), tokens_BxL, weights_BxL


TASKS: dict[str, Callable] = {"lm": lm_task, "mlm": mlm_task, "sft": sft_task, "skipgram": word2vec.skipgram_task}
# The loss sums of (logits, targets, weights): one target per position (objectives'
# cross-entropy), except the skip-gram's 2 * window neighbours per position.
LOSS_SUMS: dict[str, Callable] = {"skipgram": word2vec.skipgram_sums}


def _split_microbatches(tree, num_micro: int):
    return jax.tree.map(lambda x: x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:]), tree)


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation, schedule: optax.Schedule):
    """The optimizer update shared by every task, with the norms worth watching."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "train/grad_norm": optax.tree.norm(grads),
        "train/update_norm": optax.tree.norm(updates),
        "train/param_norm": optax.tree.norm(params),
        "train/learning_rate": schedule(state.step),
    }
    if isinstance(opt_state, optax.ApplyIfFiniteState):  # optimizer.skip_nonfinite_steps > 0
        metrics["train/skipped_steps"] = opt_state.total_notfinite
        metrics["train/consecutive_skips"] = opt_state.notfinite_count
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(model, tx: optax.GradientTransformation, schedule: optax.Schedule, *, task: str,
                    token_info: TokenInfo, z_loss_weight: float = 0.0, grad_accum_steps: int = 1,
                    task_options: dict | None = None):
    """`task_options`: keyword arguments of the task's batch preparation (the skip-gram's window)."""
    prepare = functools.partial(TASKS[task], **(task_options or {}))
    loss_sums = LOSS_SUMS.get(task, objectives.cross_entropy_sums)

    def sums_fn(params, inputs, targets_BxL, weights_BxL, dropout_rng):
        logits_BxLxV = model.apply({"params": params}, **inputs, deterministic=False, rngs={"dropout": dropout_rng})
        return loss_sums(logits_BxLxV, targets_BxL, weights_BxL, z_loss_weight=z_loss_weight)

    def train_step(state: TrainState, batch):
        step_rng = jax.random.fold_in(state.rng, state.step)
        task_rng, dropout_rng = jax.random.split(step_rng)
        inputs, targets_BxL, weights_BxL = prepare(batch, task_rng, token_info)
        # Normalise by the whole batch's token count, so accumulation equals one big batch.
        total_weight = jnp.maximum(weights_BxL.sum(), 1).astype(jnp.float32)

        def loss_and_sums(params, micro):
            inputs, targets, weights, rng = micro
            sums = sums_fn(params, inputs, targets, weights, rng)
            return (sums["loss_sum"] + sums["z_loss_sum"]) / total_weight, sums

        grad_fn = jax.value_and_grad(loss_and_sums, has_aux=True)
        if grad_accum_steps == 1:
            (_, sums), grads = grad_fn(state.params, (inputs, targets_BxL, weights_BxL, dropout_rng))
        else:
            micro = _split_microbatches((inputs, targets_BxL, weights_BxL), grad_accum_steps)
            micro_rngs = jax.random.split(dropout_rng, grad_accum_steps)

            def accumulate(carry, xs):
                grads_acc, sums_acc = carry
                (_, sums), grads = grad_fn(state.params, (*xs[0], xs[1]))
                return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None

            zero_grads = jax.tree.map(jnp.zeros_like, state.params)
            zero_sums = jax.tree.map(lambda s: jnp.zeros((), s.dtype),
                                     jax.eval_shape(sums_fn, state.params, *jax.tree.map(lambda x: x[0], micro),
                                                    micro_rngs[0]))
            (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), (micro, micro_rngs))

        new_state, metrics = apply_gradients(state, grads, tx, schedule)
        metrics.update({
            "train/loss": sums["loss_sum"] / total_weight,
            "train/z_loss": sums["z_loss_sum"] / total_weight,
            "train/accuracy": sums["correct_sum"] / total_weight,
            "train/tokens": sums["weight_sum"],
        })
        return new_state, metrics

    return train_step


def make_eval_step(model, *, task: str, token_info: TokenInfo, seed: int = 0, task_options: dict | None = None):
    """Eval sums for one batch. MLM masking uses a fixed rng, so every eval sees the same masks."""
    prepare = functools.partial(TASKS[task], **(task_options or {}))
    loss_sums = LOSS_SUMS.get(task, objectives.cross_entropy_sums)

    def eval_step(params, batch):
        inputs, targets_BxL, weights_BxL = prepare(batch, jax.random.key(seed), token_info)
        logits_BxLxV = model.apply({"params": params}, **inputs, deterministic=True)
        return loss_sums(logits_BxLxV, targets_BxL, weights_BxL)

    return eval_step


# --------------------------------------------------------------------------------------------
# Preference learning: batches hold groups of responses to one prompt, tokens int32[B, K, L]
# (K = 2 for chosen/rejected pairs, index 0 chosen), with `loss_mask` on response tokens.
# --------------------------------------------------------------------------------------------

def _flatten_groups(x_BxKxR):
    """[B, K, ...] -> [B*K, ...]: every response is a row of its own for the model."""
    return x_BxKxR.reshape(-1, *x_BxKxR.shape[2:])


def response_logps(model, params, batch, *, deterministic: bool, dropout_rng=None):
    """Summed log-probs of each response given its prompt, and its token count: ([B, K], [B, K])."""
    B, K, L = batch["tokens"].shape
    tokens_NxL = _flatten_groups(batch["tokens"])
    logits_NxLxV = model.apply({"params": params}, tokens_NxL, mask_BxL=_flatten_groups(batch["mask"]),
                               deterministic=deterministic,
                               rngs=None if deterministic else {"dropout": dropout_rng})
    targets_NxL, weights_NxL = shifted_targets(tokens_NxL, _flatten_groups(batch["loss_mask"]))
    logps_N, counts_N = objectives.sequence_logps(logits_NxLxV, targets_NxL, weights_NxL)
    return logps_N.reshape(B, K), counts_N.reshape(B, K)


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    beta: float = 0.1
    loss_type: str = "sigmoid"  # 'sigmoid' (DPO) | 'ipo'
    label_smoothing: float = 0.0  # conservative DPO
    reference_free: bool = False
    # RPO (Pang et al. 2024, TRL's rpo_alpha): + alpha * the chosen response's per-token NLL. It
    # keeps DPO from lowering the likelihood of chosen answers along with rejected ones, which
    # derails sampling in iterative / online DPO.
    rpo_alpha: float = 0.0
    # True: the batch carries 'reference_logps' computed once before training. False: the frozen
    # reference parameters are an explicit argument of the step and run on the fly.
    cached_reference: bool = True


def _dpo_terms(model, settings: DPOSettings, params, batch, reference_params, *, deterministic, dropout_rng=None):
    """Per-pair DPO losses, implicit rewards and the policy / reference log-probs."""
    policy_BxK, counts_BxK = response_logps(model, params, batch, deterministic=deterministic,
                                            dropout_rng=dropout_rng)
    if settings.reference_free:
        reference_BxK = jnp.zeros_like(policy_BxK)
    elif settings.cached_reference:
        reference_BxK = batch["reference_logps"]
    else:
        reference_BxK = jax.lax.stop_gradient(
            response_logps(model, reference_params, batch, deterministic=True)[0])
    if settings.loss_type == "ipo":  # IPO compares length-averaged log-ratios
        lengths_BxK = jnp.maximum(counts_BxK, 1.0)
        policy_in, reference_in = policy_BxK / lengths_BxK, reference_BxK / lengths_BxK
    else:
        policy_in, reference_in = policy_BxK, reference_BxK
    losses_B, chosen_B, rejected_B = objectives.dpo_loss(
        policy_in[:, 0], policy_in[:, 1], reference_in[:, 0], reference_in[:, 1], beta=settings.beta,
        loss_type=settings.loss_type, label_smoothing=settings.label_smoothing,
        reference_free=settings.reference_free)
    if settings.rpo_alpha:
        losses_B = losses_B + settings.rpo_alpha * objectives.chosen_nll(policy_BxK[:, 0], counts_BxK[:, 0])
    return losses_B, chosen_B, rejected_B, policy_BxK, reference_BxK


def _dpo_sums(losses_B, chosen_B, rejected_B, policy_BxK, reference_BxK, valid_B):
    """Sums over real pairs (padding pairs of the last eval batch have valid 0)."""
    valid_B = valid_B.astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(losses_B * valid_B),
        "weight_sum": jnp.sum(valid_B),
        "correct_sum": jnp.sum((chosen_B > rejected_B) * valid_B),
        "chosen_sum": jnp.sum(chosen_B * valid_B),
        "rejected_sum": jnp.sum(rejected_B * valid_B),
        # Mean log-ratio to the reference over both responses: a KL proxy (the responses are not
        # sampled from the policy; online DPO measures KL on the policy's own samples).
        "log_ratio_sum": jnp.sum(jnp.mean(policy_BxK - reference_BxK, axis=1) * valid_B),
    }


def summarize_preference_sums(sums, prefix: str) -> dict[str, float]:
    weight = max(float(sums["weight_sum"]), 1.0)
    chosen, rejected = float(sums["chosen_sum"]) / weight, float(sums["rejected_sum"]) / weight
    return {f"{prefix}/loss": float(sums["loss_sum"]) / weight,
            f"{prefix}/rewards/chosen": chosen, f"{prefix}/rewards/rejected": rejected,
            f"{prefix}/rewards/accuracy": float(sums["correct_sum"]) / weight,
            f"{prefix}/rewards/margin": chosen - rejected,
            f"{prefix}/kl": float(sums["log_ratio_sum"]) / weight}


def make_dpo_train_step(model, tx, schedule, settings: DPOSettings):
    """step(state, batch[, reference_params]) -> (state, metrics). The reference is frozen: either
    its cached log-probs ride in the batch or its parameters are passed in, never trained."""

    def train_step(state: TrainState, batch, reference_params=None):
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        valid_B = batch["valid"].astype(jnp.float32)

        def loss_fn(params):
            terms = _dpo_terms(model, settings, params, batch, reference_params, deterministic=False,
                               dropout_rng=dropout_rng)
            return jnp.sum(terms[0] * valid_B) / jnp.maximum(jnp.sum(valid_B), 1.0), terms

        (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state, metrics = apply_gradients(state, grads, tx, schedule)
        sums = _dpo_sums(*terms, batch["valid"])
        weight = jnp.maximum(sums["weight_sum"], 1.0)
        metrics.update({
            "train/loss": sums["loss_sum"] / weight,
            "train/rewards/chosen": sums["chosen_sum"] / weight,
            "train/rewards/rejected": sums["rejected_sum"] / weight,
            "train/rewards/accuracy": sums["correct_sum"] / weight,
            "train/rewards/margin": (sums["chosen_sum"] - sums["rejected_sum"]) / weight,
            "train/kl": sums["log_ratio_sum"] / weight,
        })
        return new_state, metrics

    return train_step


def make_dpo_eval_step(model, settings: DPOSettings):
    def eval_step(params, batch, reference_params=None):
        terms = _dpo_terms(model, settings, params, batch, reference_params, deterministic=True)
        return _dpo_sums(*terms, batch["valid"])

    return eval_step


def make_reference_logps_fn(model):
    """(params, batch) -> summed log-probs [B, K]: run once over the data to cache DPO's reference."""
    return lambda params, batch: response_logps(model, params, batch, deterministic=True)[0]


# --------------------------------------------------------------------------------------------
# Reward model: a scalar per response; Bradley-Terry over every ordered pair of a ranking.
# --------------------------------------------------------------------------------------------

def response_rewards(model, params, batch, *, deterministic: bool, dropout_rng=None):
    """Scalar rewards [P, K] of each response (the model's scalar head at its last real token)."""
    P, K, _ = batch["tokens"].shape
    rewards_N = model.apply({"params": params}, _flatten_groups(batch["tokens"]),
                            mask_BxL=_flatten_groups(batch["mask"]), deterministic=deterministic,
                            rngs=None if deterministic else {"dropout": dropout_rng})
    return rewards_N.reshape(P, K).astype(jnp.float32)


def _ranking_sums(loss, metrics):
    num_prompts = metrics["num_prompts"].astype(jnp.float32)
    num_pairs = metrics["num_pairs"].astype(jnp.float32)
    return {"loss_sum": loss * num_prompts, "weight_sum": num_prompts,
            "correct_sum": metrics["accuracy"] * num_pairs, "pair_sum": num_pairs}


def summarize_reward_sums(sums) -> dict[str, float]:
    return {"eval/loss": float(sums["loss_sum"]) / max(float(sums["weight_sum"]), 1.0),
            "eval/accuracy": float(sums["correct_sum"]) / max(float(sums["pair_sum"]), 1.0),
            "eval/pairs": float(sums["pair_sum"])}


def make_reward_train_step(model, tx, schedule, *, margin: float = 0.0):
    def train_step(state: TrainState, batch):
        dropout_rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            rewards_PxK = response_rewards(model, params, batch, deterministic=False, dropout_rng=dropout_rng)
            return objectives.ranking_loss(rewards_PxK, batch["ranks"], batch["valid"], margin=margin)

        (loss, ranking_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state, metrics = apply_gradients(state, grads, tx, schedule)
        metrics.update({"train/loss": loss, "train/accuracy": ranking_metrics["accuracy"],
                        "train/pairs": ranking_metrics["num_pairs"]})
        return new_state, metrics

    return train_step


def make_reward_eval_step(model, *, margin: float = 0.0):
    def eval_step(params, batch):
        rewards_PxK = response_rewards(model, params, batch, deterministic=True)
        return _ranking_sums(*objectives.ranking_loss(rewards_PxK, batch["ranks"], batch["valid"], margin=margin))

    return eval_step
