"""Losses against numbers worked out by hand, padding invariance, and MLM masking statistics."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import objectives

# A tiny example, vocabulary 3, worked out by hand below:
#   position 0: logits [1, 2, 3], target 2 -> CE = log(e^1 + e^2 + e^3) - 3, argmax 2 is right.
#   position 1: logits [0, 0, 0], target 1 -> CE = log(3), argmax 0 (first of a tie) is wrong.
LOGITS_2x3 = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
TARGETS_2 = np.array([2, 1], np.int32)
LOGSUMEXP_0 = math.log(math.exp(1) + math.exp(2) + math.exp(3))
LOGSUMEXP_1 = math.log(3.0)
CE_0 = LOGSUMEXP_0 - 3.0
CE_1 = LOGSUMEXP_1 - 0.0


def test_cross_entropy_sums_by_hand():
    weights = np.array([1.0, 0.5], np.float32)
    sums = objectives.cross_entropy_sums(
        LOGITS_2x3[None], TARGETS_2[None], weights[None], z_loss_weight=0.01
    )
    np.testing.assert_allclose(sums["loss_sum"], 1.0 * CE_0 + 0.5 * CE_1, rtol=1e-6)
    np.testing.assert_allclose(
        sums["z_loss_sum"], 0.01 * (1.0 * LOGSUMEXP_0**2 + 0.5 * LOGSUMEXP_1**2), rtol=1e-6
    )
    np.testing.assert_allclose(sums["correct_sum"], 1.0)
    np.testing.assert_allclose(sums["weight_sum"], 1.5)


def test_cross_entropy_is_stable_for_large_logits():
    # Naive softmax would overflow: exp(1000) is inf in float32. CE = 1000 + log(1 + 2e^-1000).
    logits = np.array([[[1000.0, 0.0, 0.0]]], np.float32)
    sums = objectives.cross_entropy_sums(logits, np.array([[1]]), np.array([[1.0]]))
    np.testing.assert_allclose(sums["loss_sum"], 1000.0, rtol=1e-6)


def _lm_example():
    """Length 3: position 0 predicts tokens[1] = 2, position 1 predicts tokens[2] = 1, and the
    last position predicts nothing, so its logits (9s) must never matter."""
    logits_1x3x3 = np.concatenate([LOGITS_2x3, [[9.0, 9.0, 9.0]]])[None]
    tokens_1x3 = np.array([[0, 2, 1]], np.int32)
    return logits_1x3x3, tokens_1x3


def test_lm_loss_by_hand():
    logits, tokens = _lm_example()
    loss, metrics = objectives.lm_loss(logits, tokens, np.ones_like(tokens))
    np.testing.assert_allclose(loss, (CE_0 + CE_1) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], (CE_0 + CE_1) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["z_loss"], 0.0)
    np.testing.assert_allclose(metrics["accuracy"], 0.5)
    np.testing.assert_allclose(metrics["num_tokens"], 2.0)


def test_lm_loss_z_loss_by_hand():
    logits, tokens = _lm_example()
    loss, metrics = objectives.lm_loss(logits, tokens, np.ones_like(tokens), z_loss_weight=1e-2)
    z_loss_mean = 1e-2 * (LOGSUMEXP_0**2 + LOGSUMEXP_1**2) / 2
    np.testing.assert_allclose(metrics["z_loss"], z_loss_mean, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], (CE_0 + CE_1) / 2, rtol=1e-6)
    np.testing.assert_allclose(loss, (CE_0 + CE_1) / 2 + z_loss_mean, rtol=1e-6)


def test_lm_loss_by_hand_with_padding():
    logits, tokens = _lm_example()
    # The last token is padding, so only position 0's prediction (of tokens[1]) counts.
    loss, metrics = objectives.lm_loss(logits, tokens, np.array([[1, 1, 0]]))
    np.testing.assert_allclose(loss, CE_0, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], 1.0)
    np.testing.assert_allclose(metrics["num_tokens"], 1.0)


def test_lm_loss_ignores_logits_and_tokens_at_padding():
    rng_logits, rng_noise, rng_tokens = jax.random.split(jax.random.key(0), 3)
    logits = jax.random.normal(rng_logits, (2, 6, 11))
    tokens = jax.random.randint(rng_tokens, (2, 6), 0, 11)
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    # Positions whose target is padding, and every last position, predict nothing that counts.
    predicts_nothing = jnp.concatenate([mask[:, 1:] == 0, jnp.ones((2, 1), bool)], axis=1)
    noisy_logits = jnp.where(
        predicts_nothing[..., None], 100 * jax.random.normal(rng_noise, logits.shape), logits
    )
    noisy_tokens = jnp.where(mask == 0, 7 - tokens, tokens)
    loss, metrics = objectives.lm_loss(logits, tokens, mask, z_loss_weight=1e-3)
    noisy_loss, noisy_metrics = objectives.lm_loss(
        noisy_logits, noisy_tokens, mask, z_loss_weight=1e-3
    )
    np.testing.assert_allclose(noisy_loss, loss, rtol=1e-6)
    for key in metrics:
        np.testing.assert_allclose(noisy_metrics[key], metrics[key], rtol=1e-6)
    np.testing.assert_allclose(metrics["num_tokens"], 3 + 5)

    grad = jax.grad(lambda x: objectives.lm_loss(x, tokens, mask, z_loss_weight=1e-3)[0])(logits)
    np.testing.assert_array_equal(np.asarray(grad)[np.asarray(predicts_nothing)], 0.0)


def test_lm_loss_with_no_real_tokens_is_zero_not_nan():
    logits, tokens = _lm_example()
    loss, metrics = objectives.lm_loss(logits, tokens, np.zeros_like(tokens))
    assert float(loss) == 0.0
    assert float(metrics["num_tokens"]) == 0.0


def test_bf16_logits_give_float32_loss():
    logits, tokens = _lm_example()
    logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
    loss, metrics = jax.jit(objectives.lm_loss)(logits_bf16, tokens, np.ones_like(tokens))
    assert loss.dtype == jnp.float32
    assert all(value.dtype == jnp.float32 for value in metrics.values())
    # These logits are exact in bf16, so the loss matches the float32 one.
    np.testing.assert_allclose(loss, (CE_0 + CE_1) / 2, rtol=1e-6)


def test_mlm_loss_counts_only_weighted_positions():
    weights = np.array([[0, 1]], np.int32)
    loss, metrics = objectives.mlm_loss(LOGITS_2x3[None], TARGETS_2[None], weights)
    np.testing.assert_allclose(loss, CE_1, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], 0.0)
    np.testing.assert_allclose(metrics["num_tokens"], 1.0)
    # Changing the logits or target at the unweighted position changes nothing.
    other_logits = LOGITS_2x3.copy()
    other_logits[0] = [50.0, -3.0, 7.0]
    other_loss, other_metrics = objectives.mlm_loss(
        other_logits[None], np.array([[0, 1]]), weights, z_loss_weight=0.0
    )
    np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
    np.testing.assert_allclose(other_metrics["accuracy"], metrics["accuracy"])


# Byte-level tokenizer layout: pad 0, eos 1, mask 2, bytes from 3.
MASK_ID, NUM_SPECIAL, VOCAB_SIZE = 2, 3, 259


def _mlm_batch(batch=64, length=512):
    """Random tokens with special ids sprinkled in and a padded tail in every other row. The
    padded positions hold ordinary ids, so only the mask can keep them from being selected."""
    rng_tokens, rng_special = jax.random.split(jax.random.key(1))
    tokens = jax.random.randint(rng_tokens, (batch, length), NUM_SPECIAL, VOCAB_SIZE)
    is_special = jax.random.bernoulli(rng_special, 0.05, (batch, length))
    tokens = jnp.where(is_special, tokens % NUM_SPECIAL, tokens)
    mask = jnp.ones((batch, length), jnp.int32).at[::2, length // 2 :].set(0)
    return tokens, mask


mask_tokens = jax.jit(
    functools.partial(
        objectives.mlm_mask_tokens, mask_id=MASK_ID, vocab_size=VOCAB_SIZE, num_special=NUM_SPECIAL
    )
)


def test_mlm_masking_statistics():
    tokens, mask = _mlm_batch()
    inputs, weights = map(np.asarray, mask_tokens(jax.random.key(2), tokens, mask))
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    eligible = (mask == 1) & (tokens >= NUM_SPECIAL)
    selected = weights == 1
    assert weights.dtype == np.int32 and inputs.dtype == tokens.dtype

    # Never padding or special tokens; everything not selected is left as it was.
    assert not selected[~eligible].any()
    np.testing.assert_array_equal(inputs[~selected], tokens[~selected])

    # ~20k eligible positions: the standard error of the selected fraction is ~0.0025.
    assert abs(selected.sum() / eligible.sum() - 0.15) < 0.01
    became_mask = selected & (inputs == MASK_ID)
    kept = selected & (inputs == tokens)  # includes random draws that hit the original (1/256)
    became_random = selected & ~became_mask & ~kept
    num_selected = selected.sum()
    assert abs(became_mask.sum() / num_selected - 0.8) < 0.03
    assert abs(became_random.sum() / num_selected - 0.1) < 0.02
    assert abs(kept.sum() / num_selected - 0.1) < 0.02
    assert inputs[became_random].min() >= NUM_SPECIAL
    assert inputs[became_random].max() < VOCAB_SIZE
    # Uniform over [3, 259): mean 130.5, std 74; over ~370 draws the mean's std is ~4.
    assert abs(inputs[became_random].mean() - 130.5) < 16


def test_mlm_masking_is_deterministic_per_rng():
    tokens, mask = _mlm_batch(batch=4, length=128)
    first = mask_tokens(jax.random.key(3), tokens, mask)
    again = mask_tokens(jax.random.key(3), tokens, mask)
    other = mask_tokens(jax.random.key(4), tokens, mask)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


def test_mlm_masking_rejects_probabilities_over_one():
    tokens, mask = _mlm_batch(batch=1, length=8)
    with pytest.raises(ValueError, match="mask_token_prob"):
        objectives.mlm_mask_tokens(
            jax.random.key(0),
            tokens,
            mask,
            mask_id=MASK_ID,
            vocab_size=VOCAB_SIZE,
            num_special=NUM_SPECIAL,
            mask_token_prob=0.8,
            random_token_prob=0.3,
        )
