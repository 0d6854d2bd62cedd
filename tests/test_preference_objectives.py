"""Preference losses (reward models, DPO, IPO, KL estimates) against numbers worked out by hand.

Throughout, -log sigma(x) = log(1 + e^-x) is written `neg_log_sigmoid(x)` and computed with math.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import objectives


def neg_log_sigmoid(x):
    return math.log1p(math.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------------
# sequence_logps


def test_sequence_logps_by_hand_counts_weighted_positions_only():
    # Vocabulary 3, length 3; the caller has already aligned targets with logits.
    #   position 0: logits [1, 2, 3], target 2 -> log p = 3 - log(e^1 + e^2 + e^3)
    #   position 1: logits [0, 0, 0], target 1 -> log p = -log 3
    #   position 2: weight 0, so its logits and target never matter.
    logits = np.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, -1.0, 0.0]]], np.float32)
    targets = np.array([[2, 1, 1]], np.int32)
    weights = np.array([[1, 1, 0]], np.int32)
    expected = (3.0 - math.log(math.e + math.e**2 + math.e**3)) + (0.0 - math.log(3.0))

    logps, counts = objectives.sequence_logps(logits, targets, weights)
    assert logps.shape == counts.shape == (1,)
    np.testing.assert_allclose(logps, [expected], rtol=1e-6)
    np.testing.assert_allclose(counts, [2.0])

    other_logits = logits.copy()
    other_logits[0, 2] = [-40.0, 70.0, 3.0]
    other_logps, _ = objectives.sequence_logps(other_logits, np.array([[2, 1, 0]]), weights)
    np.testing.assert_allclose(other_logps, logps, rtol=1e-6)


def test_sequence_logps_keeps_leading_dims_and_returns_float32():
    # [B=3, 2 (chosen, rejected), L=4, V=5] in bf16: each (b, c) row equals its own [1, L, V] call.
    logits = jax.random.normal(jax.random.key(0), (3, 2, 4, 5)).astype(jnp.bfloat16)
    targets = jax.random.randint(jax.random.key(1), (3, 2, 4), 0, 5)
    weights = jax.random.bernoulli(jax.random.key(2), 0.7, (3, 2, 4)).astype(jnp.int32)
    logps, counts = jax.jit(objectives.sequence_logps)(logits, targets, weights)
    assert logps.shape == counts.shape == (3, 2)
    assert logps.dtype == counts.dtype == jnp.float32
    for b in range(3):
        for c in range(2):
            row_logps, row_counts = objectives.sequence_logps(
                logits[b, c][None], targets[b, c][None], weights[b, c][None]
            )
            np.testing.assert_allclose(logps[b, c], row_logps[0], rtol=1e-6)
            np.testing.assert_allclose(counts[b, c], row_counts[0])


# ---------------------------------------------------------------------------------------------
# Bradley-Terry pairs


def test_bradley_terry_by_hand():
    chosen = np.array([2.0, 0.5], np.float32)
    rejected = np.array([1.0, 1.5], np.float32)
    # Gaps r_c - r_r = [1, -1]: the first pair is ranked right, the second wrong.
    loss, metrics = objectives.bradley_terry_loss(chosen, rejected)
    np.testing.assert_allclose(loss, (neg_log_sigmoid(1.0) + neg_log_sigmoid(-1.0)) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], 0.5)
    np.testing.assert_allclose(metrics["margin"], (1.0 - 1.0) / 2)
    np.testing.assert_allclose(metrics["chosen_reward"], (2.0 + 0.5) / 2)
    np.testing.assert_allclose(metrics["rejected_reward"], (1.0 + 1.5) / 2)


def test_bradley_terry_with_margin_by_hand():
    chosen = np.array([2.0, 0.5], np.float32)
    rejected = np.array([1.0, 1.5], np.float32)
    margin = np.array([0.5, 1.0], np.float32)
    # -log sigma(r_c - r_r - m): arguments 1 - 0.5 = 0.5 and -1 - 1 = -2.
    loss, metrics = objectives.bradley_terry_loss(chosen, rejected, margin_B=margin)
    np.testing.assert_allclose(loss, (neg_log_sigmoid(0.5) + neg_log_sigmoid(-2.0)) / 2, rtol=1e-6)
    # The margin changes the loss, not what counts as ranking a pair right.
    np.testing.assert_allclose(metrics["accuracy"], 0.5)
    np.testing.assert_allclose(metrics["margin"], 0.0)


def test_bradley_terry_is_stable_for_large_gaps():
    loss, _ = objectives.bradley_terry_loss(np.array([0.0]), np.array([200.0]))
    np.testing.assert_allclose(loss, 200.0, rtol=1e-6)  # log(1 + e^200) = 200 + log(1 + e^-200)


# ---------------------------------------------------------------------------------------------
# InstructGPT's K-way ranking loss


def _ranking(rewards, ranks, valid=None, **kwargs):
    rewards = np.array(rewards, np.float32)
    ranks = np.array(ranks, np.int32)
    valid = np.ones_like(ranks) if valid is None else np.array(valid, np.int32)
    return objectives.ranking_loss(rewards, ranks, valid, **kwargs)


def test_ranking_loss_k3_by_hand():
    # Ranks [1, 0, 2]: response 1 is best, then 0, then 2. Pairs (winner, loser) and gaps:
    #   (1, 0): 1.0 - 1.2 = -0.2 (ranked wrong), (1, 2): 1.0 + 0.5 = 1.5, (0, 2): 1.2 + 0.5 = 1.7,
    # each weighted 1 / C(3, 2) = 1/3.
    loss, metrics = _ranking([[1.2, 1.0, -0.5]], [[1, 0, 2]])
    expected = (neg_log_sigmoid(-0.2) + neg_log_sigmoid(1.5) + neg_log_sigmoid(1.7)) / 3
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["num_pairs"], 3)
    np.testing.assert_allclose(metrics["num_prompts"], 1)


def test_ranking_loss_margin_by_hand():
    loss, metrics = _ranking([[1.2, 1.0, -0.5]], [[1, 0, 2]], margin=0.25)
    expected = (neg_log_sigmoid(-0.45) + neg_log_sigmoid(1.25) + neg_log_sigmoid(1.45)) / 3
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], 2 / 3, rtol=1e-6)


def test_ranking_loss_k4_has_six_pairs():
    rewards = [0.5, -1.0, 2.0, 1.0]
    ranks = [2, 3, 0, 1]  # best to worst: 2, 3, 0, 1
    loss, metrics = _ranking([rewards], [ranks])
    # Pairs (winner, loser) and gaps: (2,3): 2-1=1, (2,0): 2-0.5=1.5, (2,1): 2+1=3,
    # (3,0): 1-0.5=0.5, (3,1): 1+1=2, (0,1): 0.5+1=1.5; C(4, 2) = 6, each weighted 1/6.
    gaps = [1.0, 1.5, 3.0, 0.5, 2.0, 1.5]
    np.testing.assert_allclose(loss, sum(map(neg_log_sigmoid, gaps)) / 6, rtol=1e-6)
    np.testing.assert_allclose(metrics["num_pairs"], 6)
    np.testing.assert_allclose(metrics["accuracy"], 1.0)  # rewards sorted like the ranks


def test_ranking_loss_ties_make_no_pair():
    # Ranks [0, 1, 1, 2]: responses 1 and 2 tie, so 5 pairs rather than 6:
    #   (0,1): 3-1=2, (0,2): 3-2=1, (0,3): 3-0=3, (1,3): 1-0=1, (2,3): 2-0=2.
    loss, metrics = _ranking([[3.0, 1.0, 2.0, 0.0]], [[0, 1, 1, 2]])
    expected = (2 * neg_log_sigmoid(2.0) + 2 * neg_log_sigmoid(1.0) + neg_log_sigmoid(3.0)) / 5
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["num_pairs"], 5)


def test_ranking_loss_padded_responses_make_no_pair():
    # The K=3 example padded to K=4 with a response whose reward and rank are garbage.
    loss, metrics = _ranking([[1.2, 1.0, -0.5, 1e4]], [[1, 0, 2, -7]], valid=[[1, 1, 1, 0]])
    expected, _ = _ranking([[1.2, 1.0, -0.5]], [[1, 0, 2]])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["num_pairs"], 3)
    np.testing.assert_allclose(metrics["accuracy"], 2 / 3, rtol=1e-6)

    # The padded response gets no gradient.
    ranks, valid = jnp.array([[1, 0, 2, -7]]), jnp.array([[1, 1, 1, 0]])
    grads = jax.grad(lambda r: objectives.ranking_loss(r, ranks, valid)[0])(
        jnp.array([[1.2, 1.0, -0.5, 1e4]])
    )
    assert float(grads[0, 3]) == 0.0


def test_ranking_loss_each_prompt_counts_once_whatever_its_k():
    # Prompt A: K=2 (padded to 4), one pair with gap 0.5 - 1.5 = -1.
    # Prompt B: K=4, six pairs, mean loss L_B. Prompt C: a single response, no pair: left out.
    # loss = (L_A + L_B) / 2, not (L_A + 6 L_B) / 7.
    rewards_b = [0.5, -1.0, 2.0, 1.0]
    ranks_b = [2, 3, 0, 1]
    loss_b, _ = _ranking([rewards_b], [ranks_b])
    loss_a = neg_log_sigmoid(-1.0)
    loss, metrics = _ranking(
        [[0.5, 1.5, 0.0, 0.0], rewards_b, [9.0, 0.0, 0.0, 0.0]],
        [[0, 1, 0, 0], ranks_b, [0, 0, 0, 0]],
        valid=[[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]],
    )
    np.testing.assert_allclose(loss, (loss_a + float(loss_b)) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["num_pairs"], 7)
    np.testing.assert_allclose(metrics["num_prompts"], 2)
    np.testing.assert_allclose(metrics["accuracy"], 6 / 7, rtol=1e-6)


def test_ranking_loss_without_pairs_is_zero_not_nan():
    loss, metrics = _ranking([[1.0, 2.0]], [[0, 0]])
    assert float(loss) == 0.0
    assert float(metrics["accuracy"]) == 0.0
    assert float(metrics["num_pairs"]) == 0.0


def test_ranking_loss_k2_equals_bradley_terry():
    chosen = np.array([2.0, 0.5], np.float32)
    rejected = np.array([1.0, 1.5], np.float32)
    loss, _ = objectives.ranking_loss(
        np.stack([chosen, rejected], axis=1), np.array([[0, 1], [0, 1]]), np.ones((2, 2))
    )
    bt_loss, _ = objectives.bradley_terry_loss(chosen, rejected)
    np.testing.assert_allclose(loss, bt_loss, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# DPO family
#
# Two examples, sequence log-probs (policy chosen, policy rejected, reference chosen, reference
# rejected):
#   example 0: (-10, -12, -11, -11.5): policy log-ratio 2, reference log-ratio 0.5 -> z = 1.5
#   example 1: (-5, -4, -5, -5):        policy log-ratio -1, reference log-ratio 0 -> z = -1
POLICY_CHOSEN = np.array([-10.0, -5.0], np.float32)
POLICY_REJECTED = np.array([-12.0, -4.0], np.float32)
REFERENCE_CHOSEN = np.array([-11.0, -5.0], np.float32)
REFERENCE_REJECTED = np.array([-11.5, -5.0], np.float32)
Z = [1.5, -1.0]
LOGPS = (POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED)


def test_dpo_sigmoid_by_hand():
    losses, chosen_rewards, rejected_rewards = objectives.dpo_loss(*LOGPS, beta=0.1)
    np.testing.assert_allclose(losses, [neg_log_sigmoid(0.15), neg_log_sigmoid(-0.1)], rtol=1e-6)
    # beta * (policy - reference): 0.1 * (-10 + 11), 0.1 * (-5 + 5); 0.1 * (-12 + 11.5), 0.1 * 1.
    np.testing.assert_allclose(chosen_rewards, [0.1, 0.0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rejected_rewards, [-0.05, 0.1], rtol=1e-6)


def test_dpo_beta_scales_exactly_once():
    losses_1, chosen_1, rejected_1 = objectives.dpo_loss(*LOGPS, beta=0.1)
    losses_2, chosen_2, rejected_2 = objectives.dpo_loss(*LOGPS, beta=0.2)
    # Doubling beta with z fixed: -log sigma(2 beta z), not -log sigma(4 beta z) (beta twice).
    np.testing.assert_allclose(losses_2, [neg_log_sigmoid(0.2 * z) for z in Z], rtol=1e-6)
    assert not np.allclose(losses_2, [neg_log_sigmoid(0.4 * z) for z in Z], rtol=1e-3)
    assert not np.allclose(losses_1, [neg_log_sigmoid(0.01 * z) for z in Z], rtol=1e-3)
    # Implicit rewards are linear in beta: they double exactly.
    np.testing.assert_allclose(chosen_2, 2 * np.asarray(chosen_1), rtol=1e-6)
    np.testing.assert_allclose(rejected_2, 2 * np.asarray(rejected_1), rtol=1e-6)
    # And the loss is -log sigma(chosen_reward - rejected_reward): the rewards carry beta once.
    np.testing.assert_allclose(losses_2, -jax.nn.log_sigmoid(chosen_2 - rejected_2), rtol=1e-6)


def test_dpo_label_smoothing_by_hand():
    # cDPO, eps = 0.1: -(1 - eps) log sigma(beta z) - eps log sigma(-beta z).
    losses, _, _ = objectives.dpo_loss(*LOGPS, beta=0.1, label_smoothing=0.1)
    expected = [0.9 * neg_log_sigmoid(0.1 * z) + 0.1 * neg_log_sigmoid(-0.1 * z) for z in Z]
    np.testing.assert_allclose(losses, expected, rtol=1e-6)


def test_ipo_by_hand():
    # (z - 1 / (2 beta))^2 with beta = 0.1: target 5, so (1.5 - 5)^2 = 12.25 and (-1 - 5)^2 = 36.
    losses, chosen_rewards, _ = objectives.dpo_loss(*LOGPS, beta=0.1, loss_type="ipo")
    np.testing.assert_allclose(losses, [12.25, 36.0], rtol=1e-6)
    np.testing.assert_allclose(chosen_rewards, [0.1, 0.0], rtol=1e-6, atol=1e-7)
    # beta sets the target once: beta = 0.25 gives target 2, so (1.5 - 2)^2 and (-1 - 2)^2.
    losses, _, _ = objectives.dpo_loss(*LOGPS, beta=0.25, loss_type="ipo")
    np.testing.assert_allclose(losses, [0.25, 9.0], rtol=1e-6)


def test_dpo_reference_free_ignores_the_reference():
    nan = np.full(2, np.nan, np.float32)
    losses, chosen_rewards, rejected_rewards = objectives.dpo_loss(
        POLICY_CHOSEN, POLICY_REJECTED, nan, nan, beta=0.1, reference_free=True
    )
    # z = policy log-ratio alone: -10 + 12 = 2 and -5 + 4 = -1; rewards beta * policy logps.
    np.testing.assert_allclose(losses, [neg_log_sigmoid(0.2), neg_log_sigmoid(-0.1)], rtol=1e-6)
    np.testing.assert_allclose(chosen_rewards, [-1.0, -0.5], rtol=1e-6)
    np.testing.assert_allclose(rejected_rewards, [-1.2, -0.4], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(loss_type="hinge"), "loss_type"),
        (dict(label_smoothing=0.5), "label_smoothing"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
    ],
)
def test_dpo_rejects_invalid_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        objectives.dpo_loss(*LOGPS, beta=0.1, **kwargs)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_sigmoid_gradient_by_hand(label_smoothing):
    # d/dz [-(1 - eps) log sigma(beta z) - eps log sigma(-beta z)]
    #   = -(1 - eps) beta sigma(-beta z) + eps beta sigma(beta z),
    # and z = (pc - pr) - (rc - rr), so d/d(pc) is that and d/d(pr) its negative.
    beta, eps = 0.1, label_smoothing

    def total_loss(policy_chosen, policy_rejected):
        losses, _, _ = objectives.dpo_loss(
            policy_chosen,
            policy_rejected,
            REFERENCE_CHOSEN,
            REFERENCE_REJECTED,
            beta=beta,
            label_smoothing=eps,
        )
        return jnp.sum(losses)

    grad_chosen, grad_rejected = jax.grad(total_loss, argnums=(0, 1))(
        POLICY_CHOSEN, POLICY_REJECTED
    )
    expected = [-(1 - eps) * beta * sigmoid(-beta * z) + eps * beta * sigmoid(beta * z) for z in Z]
    np.testing.assert_allclose(grad_chosen, expected, rtol=1e-5)
    np.testing.assert_allclose(grad_rejected, -np.array(expected), rtol=1e-5)


def test_ipo_gradient_by_hand():
    # d/dz (z - 1/(2 beta))^2 = 2 (z - 1/(2 beta)): 2 (1.5 - 5) = -7 and 2 (-1 - 5) = -12.
    grad = jax.grad(
        lambda pc: jnp.sum(objectives.dpo_loss(pc, *LOGPS[1:], beta=0.1, loss_type="ipo")[0])
    )(POLICY_CHOSEN)
    np.testing.assert_allclose(grad, [-7.0, -12.0], rtol=1e-5)


def test_dpo_loss_jits_and_is_float32():
    dpo = jax.jit(functools.partial(objectives.dpo_loss, beta=0.1, label_smoothing=0.1))
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in LOGPS]  # these values are exact in bf16
    losses, chosen_rewards, rejected_rewards = dpo(*bf16)
    assert losses.dtype == chosen_rewards.dtype == rejected_rewards.dtype == jnp.float32
    expected, _, _ = objectives.dpo_loss(*LOGPS, beta=0.1, label_smoothing=0.1)
    np.testing.assert_allclose(losses, expected, rtol=1e-6)


def test_dpo_metrics_by_hand():
    metrics = objectives.dpo_metrics(
        np.array([0.1, -0.3], np.float32),
        np.array([-0.05, 0.2], np.float32),
        np.array([1.0, 3.0], np.float32),
    )
    np.testing.assert_allclose(metrics["rewards/chosen"], (0.1 - 0.3) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/rejected"], (-0.05 + 0.2) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/accuracy"], 0.5)
    np.testing.assert_allclose(metrics["rewards/margin"], (0.15 - 0.5) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], 2.0)


# ---------------------------------------------------------------------------------------------
# KL estimates


def test_kl_estimate_by_hand():
    # d = policy - reference = [-10 + 11, -12 + 11.5] = [1, -0.5].
    metrics = objectives.kl_estimate(
        np.array([-10.0, -12.0]), np.array([-11.0, -11.5]), np.array([4, 6])
    )
    np.testing.assert_allclose(metrics["kl"], (1.0 - 0.5) / 2, rtol=1e-6)
    # k3 = exp(-d) - 1 + d per sequence.
    k3 = ((math.exp(-1.0) - 1 + 1.0) + (math.exp(0.5) - 1 - 0.5)) / 2
    np.testing.assert_allclose(metrics["kl_k3"], k3, rtol=1e-6)
    np.testing.assert_allclose(metrics["kl_per_token"], (1.0 - 0.5) / (4 + 6), rtol=1e-6)
    assert "kl_per_token" not in objectives.kl_estimate(np.zeros(2), np.zeros(2))


def test_kl_estimates_are_unbiased_on_policy_samples():
    # Five "sequences"; samples drawn from the policy p. KL(p || q) = sum p log(p / q).
    p = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    q = np.array([0.2, 0.2, 0.2, 0.2, 0.2])
    exact = float(np.sum(p * np.log(p / q)))
    samples = np.random.default_rng(0).choice(5, size=200_000, p=p)
    metrics = objectives.kl_estimate(np.log(p)[samples], np.log(q)[samples])
    np.testing.assert_allclose(metrics["kl"], exact, rtol=0.03)
    np.testing.assert_allclose(metrics["kl_k3"], exact, rtol=0.03)


def test_chosen_nll_is_the_per_token_negative_log_likelihood():
    from llm_jax.objectives import chosen_nll

    # Chosen responses with summed log-probs -6 over 3 tokens and -1 over 0 tokens (guarded).
    np.testing.assert_allclose(chosen_nll(jnp.array([-6.0, -1.0]), jnp.array([3, 0])), [2.0, 1.0])
