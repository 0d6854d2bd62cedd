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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from llm_jax import objectives


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
    targets_BxL = jnp.roll(tokens_BxL, -1, axis=1)
    weights_BxL = jnp.concatenate([mask_BxL[:, 1:], jnp.zeros_like(mask_BxL[:, :1])], axis=1)
    return dict(tokens_BxL=tokens_BxL, mask_BxL=mask_BxL), targets_BxL, weights_BxL


def mlm_task(batch, rng, token_info: TokenInfo):
    """Masked LM: BERT's 15% / 80-10-10 rule, the loss on the selected positions only."""
    tokens_BxL, mask_BxL = batch["tokens"], batch["mask"]
    inputs_BxL, weights_BxL = objectives.mlm_mask_tokens(
        rng, tokens_BxL, mask_BxL, mask_id=token_info.mask_id,
        vocab_size=token_info.vocab_size, num_special=token_info.num_special)
    return dict(tokens_BxL=inputs_BxL, mask_BxL=mask_BxL), tokens_BxL, weights_BxL


TASKS: dict[str, Callable] = {"lm": lm_task, "mlm": mlm_task}


def _split_microbatches(tree, num_micro: int):
    return jax.tree.map(lambda x: x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:]), tree)


def make_train_step(model, tx: optax.GradientTransformation, schedule: optax.Schedule, *, task: str,
                    token_info: TokenInfo, z_loss_weight: float = 0.0, grad_accum_steps: int = 1):
    prepare = TASKS[task]

    def sums_fn(params, inputs, targets_BxL, weights_BxL, dropout_rng):
        logits_BxLxV = model.apply({"params": params}, inputs["tokens_BxL"], mask_BxL=inputs["mask_BxL"],
                                   deterministic=False, rngs={"dropout": dropout_rng})
        return objectives.cross_entropy_sums(logits_BxLxV, targets_BxL, weights_BxL, z_loss_weight=z_loss_weight)

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

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "train/loss": sums["loss_sum"] / total_weight,
            "train/z_loss": sums["z_loss_sum"] / total_weight,
            "train/accuracy": sums["correct_sum"] / total_weight,
            "train/tokens": sums["weight_sum"],
            "train/grad_norm": optax.tree.norm(grads),
            "train/update_norm": optax.tree.norm(updates),
            "train/param_norm": optax.tree.norm(params),
            "train/learning_rate": schedule(state.step),
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(model, *, task: str, token_info: TokenInfo, seed: int = 0):
    """Eval sums for one batch. MLM masking uses a fixed rng, so every eval sees the same masks."""
    prepare = TASKS[task]

    def eval_step(params, batch):
        inputs, targets_BxL, weights_BxL = prepare(batch, jax.random.key(seed), token_info)
        logits_BxLxV = model.apply({"params": params}, inputs["tokens_BxL"], mask_BxL=inputs["mask_BxL"],
                                   deterministic=True)
        return objectives.cross_entropy_sums(logits_BxLxV, targets_BxL, weights_BxL)

    return eval_step
