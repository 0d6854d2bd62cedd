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


# Preference learning: sequence log-probabilities, reward-model losses (Bradley-Terry pairs and
# InstructGPT's K-way rankings), the DPO family, and KL estimates.


def sequence_logps(logits_BxLxV, targets_BxL, weights_BxL):
    """Per-sequence sums of weighted token log-probabilities: returns (logps_B, counts_B).

    logps[b] = sum_t weights[b, t] * log softmax(logits[b, t])[targets[b, t]] and
    counts[b] = sum_t weights[b, t] (the number of weighted tokens). The caller aligns targets with
    logits (for a causal LM: logits[:, :-1] against tokens[:, 1:]) and sets weights to 1 on the
    response tokens only. Any leading dimensions are kept: [B, 2, L, V] logits give [B, 2] outputs.
    Float32 throughout; the target logit is picked by a one-hot contraction, as in
    `cross_entropy_sums`, so a vocabulary sharded over devices needs no all-gather.
    """
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    weights_BxL = weights_BxL.astype(jnp.float32)
    onehot_BxLxV = jax.nn.one_hot(targets_BxL, logits_BxLxV.shape[-1], dtype=jnp.float32)
    target_logit_BxL = jnp.sum(logits_BxLxV * onehot_BxLxV, axis=-1)
    token_logps_BxL = target_logit_BxL - jax.nn.logsumexp(logits_BxLxV, axis=-1)
    logps_B = jnp.sum(weights_BxL * token_logps_BxL, axis=-1)
    counts_B = jnp.sum(weights_BxL, axis=-1)
    return logps_B, counts_B


def bradley_terry_loss(rewards_chosen_B, rewards_rejected_B, *, margin_B=None):
    """Reward-model loss on preference pairs: returns (loss, metrics).

    Under the Bradley-Terry model P(chosen > rejected) = sigma(r_c - r_r), so the negative
    log-likelihood is loss = mean_b -log sigma(r_c - r_r - m), InstructGPT's Eq. 1 for K = 2
    (Ouyang et al., 2022). The optional margin m (Llama 2's Eq. 2, Touvron et al., 2023) asks for a
    larger reward gap on pairs rated as clearly different; m = 0 without it. `log_sigmoid` keeps
    the loss finite for any gap.

    Metrics (float32 scalars): `accuracy` (fraction with r_c > r_r, margin not applied), `margin`
    (mean of r_c - r_r), `chosen_reward` and `rejected_reward` (means).
    """
    rewards_chosen_B = rewards_chosen_B.astype(jnp.float32)
    rewards_rejected_B = rewards_rejected_B.astype(jnp.float32)
    gap_B = rewards_chosen_B - rewards_rejected_B
    target_gap_B = gap_B if margin_B is None else gap_B - margin_B.astype(jnp.float32)
    loss = jnp.mean(-jax.nn.log_sigmoid(target_gap_B))
    metrics = {
        "accuracy": jnp.mean((gap_B > 0).astype(jnp.float32)),
        "margin": jnp.mean(gap_B),
        "chosen_reward": jnp.mean(rewards_chosen_B),
        "rejected_reward": jnp.mean(rewards_rejected_B),
    }
    return loss, metrics


def ranking_loss(rewards_PxK, ranks_PxK, valid_PxK, *, margin=0.0):
    """InstructGPT's K-way reward-model loss (Ouyang et al., 2022, Eq. 1): returns (loss, metrics).

    For each prompt p, every ordered pair (i, j) of valid responses with ranks[p, i] < ranks[p, j]
    (rank 0 is the best; equal ranks make no pair) is one comparison with loss
    -log sigma(r_i - r_j - margin). The comparisons of a prompt are weighted 1 / (their number),
    which is the paper's 1 / C(K, 2) for a full ranking without ties, so each prompt counts once
    however many answers it has: the paper trains on all comparisons of a prompt as one batch
    element because, shuffled as separate examples, the correlated comparisons made the reward model
    overfit. The loss is the mean over prompts with at least one pair (0 if there is none).

    Args:
      rewards_PxK: reward of each response.
      ranks_PxK: integer rank of each response within its prompt, 0 = best.
      valid_PxK: 1 / True for real responses, 0 / False for padding (prompts with fewer than K).
      margin: a reward gap the loss asks for beyond r_i > r_j.

    Metrics (float32 scalars): `accuracy` (fraction of all pairs with r_i > r_j, margin not
    applied), `num_pairs` (pairs in the batch), `num_prompts` (prompts with at least one pair).
    """
    rewards_PxK = rewards_PxK.astype(jnp.float32)
    valid_PxK = valid_PxK.astype(bool)
    # pair_PxKxK[p, i, j]: response i is preferred over response j, both real.
    pair_PxKxK = (
        valid_PxK[:, :, None]
        & valid_PxK[:, None, :]
        & (ranks_PxK[:, :, None] < ranks_PxK[:, None, :])
    )
    gap_PxKxK = rewards_PxK[:, :, None] - rewards_PxK[:, None, :]
    pair_loss_PxKxK = jnp.where(pair_PxKxK, -jax.nn.log_sigmoid(gap_PxKxK - margin), 0.0)
    num_pairs_P = jnp.sum(pair_PxKxK, axis=(1, 2)).astype(jnp.float32)
    has_pairs_P = num_pairs_P > 0
    prompt_loss_P = jnp.sum(pair_loss_PxKxK, axis=(1, 2)) / jnp.maximum(num_pairs_P, 1.0)
    num_prompts = jnp.sum(has_pairs_P).astype(jnp.float32)
    loss = jnp.sum(jnp.where(has_pairs_P, prompt_loss_P, 0.0)) / jnp.maximum(num_prompts, 1.0)
    num_pairs = jnp.sum(num_pairs_P)
    correct = jnp.sum(pair_PxKxK & (gap_PxKxK > 0)).astype(jnp.float32)
    metrics = {
        "accuracy": correct / jnp.maximum(num_pairs, 1.0),
        "num_pairs": num_pairs,
        "num_prompts": num_prompts,
    }
    return loss, metrics


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta,
    loss_type="sigmoid",
    label_smoothing=0.0,
    reference_free=False,
):
    """DPO-family losses on sequence log-probabilities: returns (losses_B, chosen_rewards_B,
    rejected_rewards_B).

    With z = (log pi(y_c) - log pi(y_r)) - (log ref(y_c) - log ref(y_r)), the policy's log-ratio
    minus the reference's (the reference term is 0 when `reference_free`):
      "sigmoid": DPO (Rafailov et al., 2023, Eq. 7), -log sigma(beta * z), with conservative label
                 smoothing eps (cDPO, Mitchell, 2023: the label is flipped with probability eps):
                 -(1 - eps) log sigma(beta * z) - eps log sigma(-beta * z).
      "ipo":     IPO (Azar et al., 2023, Eq. 17, with tau = beta), (z - 1 / (2 beta))^2, which
                 regresses z onto a finite target instead of pushing it to infinity. Pass
                 length-AVERAGED log-probs (sequence_logps' logps / counts) for IPO, as TRL does:
                 the target 1 / (2 beta) is then on a per-token scale whatever the lengths.
    beta multiplies z exactly once in "sigmoid" and sets the target in "ipo" (MaxText's old DPO
    scaled twice). Implicit rewards, DPO's Section 5: chosen_rewards = beta * (log pi(y_c) -
    log ref(y_c)), rejected_rewards = beta * (log pi(y_r) - log ref(y_r)) (reference 0 when
    `reference_free`). They are left differentiable; as aux outputs of a loss they get no gradient.

    Losses are per example; the caller takes the mean (or a token-weighted mean). Float32 math.
    Raises ValueError for an unknown `loss_type`, `label_smoothing` outside [0, 0.5), or
    `label_smoothing` with "ipo" (it only applies to the sigmoid loss).
    """
    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' only, got {loss_type!r}")
    policy_chosen_logps = jnp.asarray(policy_chosen_logps, jnp.float32)
    policy_rejected_logps = jnp.asarray(policy_rejected_logps, jnp.float32)
    if reference_free:
        reference_chosen_logps = jnp.zeros_like(policy_chosen_logps)
        reference_rejected_logps = jnp.zeros_like(policy_rejected_logps)
    else:
        reference_chosen_logps = jnp.asarray(reference_chosen_logps, jnp.float32)
        reference_rejected_logps = jnp.asarray(reference_rejected_logps, jnp.float32)
    chosen_logratios_B = policy_chosen_logps - reference_chosen_logps
    rejected_logratios_B = policy_rejected_logps - reference_rejected_logps
    logits_B = chosen_logratios_B - rejected_logratios_B
    if loss_type == "sigmoid":
        log_p_chosen_B = jax.nn.log_sigmoid(beta * logits_B)
        log_p_rejected_B = jax.nn.log_sigmoid(-beta * logits_B)
        losses_B = -(1.0 - label_smoothing) * log_p_chosen_B - label_smoothing * log_p_rejected_B
    else:
        losses_B = jnp.square(logits_B - 1.0 / (2.0 * beta))
    return losses_B, beta * chosen_logratios_B, beta * rejected_logratios_B


def dpo_metrics(chosen_rewards_B, rejected_rewards_B, losses_B):
    """Means of DPO's implicit rewards and losses, as float32 scalars keyed `rewards/chosen`,
    `rewards/rejected`, `rewards/accuracy` (fraction with chosen > rejected), `rewards/margin`
    (mean of chosen - rejected) and `loss`."""
    chosen_rewards_B = chosen_rewards_B.astype(jnp.float32)
    rejected_rewards_B = rejected_rewards_B.astype(jnp.float32)
    return {
        "rewards/chosen": jnp.mean(chosen_rewards_B),
        "rewards/rejected": jnp.mean(rejected_rewards_B),
        "rewards/accuracy": jnp.mean((chosen_rewards_B > rejected_rewards_B).astype(jnp.float32)),
        "rewards/margin": jnp.mean(chosen_rewards_B - rejected_rewards_B),
        "loss": jnp.mean(losses_B.astype(jnp.float32)),
    }


def kl_estimate(policy_logps_B, reference_logps_B, counts_B=None):
    """Monte-Carlo estimates of KL(policy || reference) from sequence log-probabilities.

    With d = log pi(y) - log ref(y) per sequence (sums over its tokens), and y sampled FROM THE
    POLICY, the estimators of Schulman's "Approximating KL Divergence" (2020) are:
      `kl`:           k1 = mean(d), unbiased for the per-sequence KL; a single sample can be
                      negative.
      `kl_k3`:        k3 = mean(exp(-d) - 1 + d), unbiased too (E_pi[ref / pi] = 1) and never
                      negative, with lower variance while the KL is small. It is applied to the
                      whole sequence's ratio, because a per-token k3 needs per-token log-ratios that
                      sequence sums do not keep; for long sequences with a large KL, exp(-d) makes
                      it high-variance (inf if -d > ~88) and k1 is the one to trust.
      `kl_per_token`: sum(d) / sum(counts), k1 per generated token (only when counts_B is given).
    On samples not drawn from the current policy (e.g. the chosen / rejected responses of an offline
    preference data set) neither is an estimate of the KL, only a proxy for how far the policy's
    log-probabilities have moved from the reference's on that data.
    Returns a dict of float32 scalars.
    """
    d_B = policy_logps_B.astype(jnp.float32) - reference_logps_B.astype(jnp.float32)
    metrics = {"kl": jnp.mean(d_B), "kl_k3": jnp.mean(jnp.expm1(-d_B) + d_B)}
    if counts_B is not None:
        num_tokens = jnp.sum(counts_B.astype(jnp.float32))
        metrics["kl_per_token"] = jnp.sum(d_B) / jnp.maximum(num_tokens, 1.0)
    return metrics


def chosen_nll(chosen_logps_B, chosen_counts_B):
    """Per-token negative log-likelihood of the chosen responses (RPO's extra term): their summed
    log-probs over their token counts."""
    return -chosen_logps_B.astype(jnp.float32) / jnp.maximum(chosen_counts_B.astype(jnp.float32), 1.0)
