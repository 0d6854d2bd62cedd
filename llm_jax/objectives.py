"""Pure loss functions on logits: causal LM, masked LM (BERT masking + loss), PaLM's z-loss.

Everything is computed in float32 whatever the logits' dtype. The building block,
`cross_entropy_sums`, returns sums rather than means so that a train step accumulating
gradients over micro-batches can divide by the token count of the whole batch.
"""
import jax
import jax.numpy as jnp


def cross_entropy_sums(logits_BxLxV, targets_BxL, weights_BxL, *, z_loss_weight=0.0):
    """Weighted sums of cross-entropy, z-loss, argmax hits and weights.

    Returns a dict of float32 scalars:
      loss_sum:    sum of weight * CE (z-loss excluded).
      z_loss_sum:  sum of weight * z_loss_weight * logsumexp(logits)^2, PaLM's auxiliary loss: it
                   keeps log Z near 0, which PaLM found stabilises training.
      correct_sum: sum of weight * [argmax(logits) == target].
      weight_sum:  sum of weights.
    """
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    weights_BxL = weights_BxL.astype(jnp.float32)
    log_normalizer_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    # One-hot contraction rather than a gather: when the vocabulary axis is sharded, a gather
    # would force an all-gather of the logits, while a masked reduction stays shard-local.
    onehot_BxLxV = jax.nn.one_hot(targets_BxL, logits_BxLxV.shape[-1], dtype=jnp.float32)
    target_logit_BxL = jnp.sum(logits_BxLxV * onehot_BxLxV, axis=-1)
    cross_entropy_BxL = log_normalizer_BxL - target_logit_BxL
    z_loss_BxL = z_loss_weight * jnp.square(log_normalizer_BxL)
    correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(weights_BxL * cross_entropy_BxL),
        "z_loss_sum": jnp.sum(weights_BxL * z_loss_BxL),
        "correct_sum": jnp.sum(weights_BxL * correct_BxL),
        "weight_sum": jnp.sum(weights_BxL),
    }


def loss_and_metrics_from_sums(sums):
    """Turns `cross_entropy_sums` (possibly summed over micro-batches) into (loss, metrics).

    The loss is (CE + z-loss) per weighted token; metrics report CE and z-loss separately.
    Dividing by max(weight_sum, 1) keeps a batch with no weighted tokens at loss 0, not NaN.
    """
    denominator = jnp.maximum(sums["weight_sum"], 1.0)
    loss = (sums["loss_sum"] + sums["z_loss_sum"]) / denominator
    metrics = {
        "loss": sums["loss_sum"] / denominator,
        "z_loss": sums["z_loss_sum"] / denominator,
        "accuracy": sums["correct_sum"] / denominator,
        "num_tokens": sums["weight_sum"],
    }
    return loss, metrics


def lm_loss(logits_BxLxV, tokens_BxL, mask_BxL, *, z_loss_weight=0.0):
    """Causal next-token loss: position t predicts tokens[:, t + 1], weighted by mask[:, t + 1].

    Returns (loss, metrics) with metrics `loss` (CE mean, no z-loss), `z_loss`, `accuracy`,
    `num_tokens`.
    """
    sums = cross_entropy_sums(
        logits_BxLxV[:, :-1], tokens_BxL[:, 1:], mask_BxL[:, 1:], z_loss_weight=z_loss_weight
    )
    return loss_and_metrics_from_sums(sums)


def mlm_mask_tokens(
    rng,
    tokens_BxL,
    mask_BxL,
    *,
    mask_id,
    vocab_size,
    num_special,
    mask_prob=0.15,
    mask_token_prob=0.8,
    random_token_prob=0.1,
):
    """BERT's masking: returns (inputs_BxL, weights_BxL).

    Each real (mask == 1), non-special (id >= num_special) position is selected independently with
    probability `mask_prob` (as Hugging Face's DataCollatorForLanguageModeling does). A selected
    position becomes `mask_id` with probability `mask_token_prob`, a uniformly random non-special
    token in [num_special, vocab_size) with probability `random_token_prob`, and stays unchanged
    otherwise. `weights_BxL` (int32) is 1 exactly on the selected positions: the MLM targets are
    the original tokens there.
    """
    if not 0.0 <= mask_token_prob + random_token_prob <= 1.0:
        raise ValueError(
            "mask_token_prob + random_token_prob must lie in [0, 1], got "
            f"{mask_token_prob} + {random_token_prob}"
        )
    select_rng, action_rng, random_token_rng = jax.random.split(rng, 3)
    eligible_BxL = (mask_BxL > 0) & (tokens_BxL >= num_special)
    selected_BxL = eligible_BxL & jax.random.bernoulli(select_rng, mask_prob, tokens_BxL.shape)
    # One uniform draw per position decides among mask / random / keep, so the three outcomes are
    # mutually exclusive with exactly the requested probabilities.
    action_BxL = jax.random.uniform(action_rng, tokens_BxL.shape)
    use_mask_token_BxL = selected_BxL & (action_BxL < mask_token_prob)
    use_random_token_BxL = (
        selected_BxL
        & (action_BxL >= mask_token_prob)
        & (action_BxL < mask_token_prob + random_token_prob)
    )
    random_tokens_BxL = jax.random.randint(
        random_token_rng, tokens_BxL.shape, num_special, vocab_size, dtype=tokens_BxL.dtype
    )
    inputs_BxL = jnp.where(use_mask_token_BxL, jnp.asarray(mask_id, tokens_BxL.dtype), tokens_BxL)
    inputs_BxL = jnp.where(use_random_token_BxL, random_tokens_BxL, inputs_BxL)
    return inputs_BxL, selected_BxL.astype(jnp.int32)


def mlm_loss(logits_BxLxV, targets_BxL, weights_BxL, *, z_loss_weight=0.0):
    """Masked-LM loss: CE of the original tokens, counted only where weights_BxL is non-zero.

    Returns (loss, metrics) with the same keys as `lm_loss`.
    """
    sums = cross_entropy_sums(logits_BxLxV, targets_BxL, weights_BxL, z_loss_weight=z_loss_weight)
    return loss_and_metrics_from_sums(sums)
