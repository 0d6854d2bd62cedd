"""Skip-gram (word2vec, Mikolov et al. 2013): one input and one output vector per token, no
positions, no context. Position i predicts each neighbour tokens[i + o], 0 < |o| <= window, from
its own input vector alone:

    loss = -sum_{i, o} w_io log softmax_c(in[t_i] . out[c])[t_{i+o}] / sum_{i, o} w_io

The input and output tables are separate (untied), as in word2vec. The softmax is over the whole
vocabulary: D x V multiply-adds per token, the same head a transformer of that width pays, and
fine for vocabularies of a few thousand pieces; word2vec's negative sampling (or hierarchical
softmax) only pays off for vocabularies of millions of words. The window is fixed (word2vec draws
a smaller one per centre) and frequent tokens are not subsampled, so the objective stays a plain
function of the batch.

Boundaries: packed rows (data/pipeline.py) separate documents only by EOS, with no segment ids.
A pair (i, i + o) counts when both are real tokens (mask), neither is EOS and no EOS lies between
them: word2vec trains on each sentence apart, and one file's last tokens say nothing about the
next file's first. EOS is a boundary, not a word: never a centre, never a context.

The model is built for `model.kind='word2vec'` (task 'skipgram'); `model.d_model` is the vectors'
width, the transformer fields are unused.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


class SkipGram(nn.Module):
    """tokens_BxL -> logits_BxLxV over each position's neighbours: in[token] . out^T, nothing else.

    `return_hidden=True` returns the input vectors instead (a token's features). `mask_BxL` and
    `deterministic` are accepted because the loop passes them to every model; there is no
    attention to mask and no dropout.
    """

    cfg: object  # model.TransformerConfig: vocab_size, d_model, dtype, param_dtype

    @nn.compact
    def __call__(self, tokens_BxL, *, mask_BxL=None, deterministic: bool = True, return_hidden: bool = False):
        del mask_BxL, deterministic
        cfg = self.cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

        def table(name, init):
            return nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype, name=name,
                            embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")))

        # word2vec's init: small random input vectors, zero output vectors, so every prediction
        # starts uniform.
        x_BxLxD = table("input_embed", nn.initializers.normal(stddev=0.02))(tokens_BxL)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("act_batch", "act_length", "act_embed"))
        if return_hidden:
            return x_BxLxD
        logits_BxLxV = table("output_embed", nn.initializers.zeros).attend(x_BxLxD)
        return nn.with_logical_constraint(logits_BxLxV, ("act_batch", "act_length", "act_vocab"))


def offsets(window: int) -> np.ndarray:
    """The context offsets [-window, ..., -1, 1, ..., window] (O = 2 window of them)."""
    return np.concatenate([np.arange(-window, 0), np.arange(1, window + 1)]).astype(np.int32)


def context_targets(tokens_BxL, mask_BxL, *, window: int, eos_id: int):
    """(targets_BxLxO, weights_BxLxO): the neighbour tokens[:, i + o] of each centre i for each
    offset o of `offsets(window)`, weighted 1 where the pair counts (see the module docstring)."""
    L = tokens_BxL.shape[1]
    real_BxL = mask_BxL.astype(bool) & (tokens_BxL != eos_id)
    # EOS closes a document: positions i < j lie in one document iff no EOS is in (i, j], i.e.
    # the running EOS counts at i and at j are equal (j itself is not EOS, as real_BxL requires).
    document_BxL = jnp.cumsum(tokens_BxL == eos_id, axis=1)
    neighbour_LxO = np.arange(L)[:, None] + offsets(window)[None, :]
    inside_LxO = (neighbour_LxO >= 0) & (neighbour_LxO < L)
    neighbour_LxO = np.clip(neighbour_LxO, 0, L - 1)
    targets_BxLxO = tokens_BxL[:, neighbour_LxO]
    weights_BxLxO = (inside_LxO[None] & real_BxL[:, :, None] & real_BxL[:, neighbour_LxO]
                     & (document_BxL[:, :, None] == document_BxL[:, neighbour_LxO]))
    return targets_BxLxO, weights_BxLxO.astype(jnp.int32)


def skipgram_task(batch, rng, token_info, *, window: int, eos_id: int):
    """steps.TASKS' form: (model inputs, targets_BxLxO, weights_BxLxO) of a packed text batch."""
    del rng, token_info
    targets_BxLxO, weights_BxLxO = context_targets(batch["tokens"], batch["mask"], window=window, eos_id=eos_id)
    return dict(tokens_BxL=batch["tokens"], mask_BxL=batch["mask"]), targets_BxLxO, weights_BxLxO


def skipgram_sums(logits_BxLxV, targets_BxLxO, weights_BxLxO, *, z_loss_weight=0.0):
    """`objectives.cross_entropy_sums` with O targets per position, all scored against the same
    logits (one log-normaliser per centre); sums run over the (centre, context) pairs."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    weights_BxLxO = weights_BxLxO.astype(jnp.float32)
    log_normalizer_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    # A gather, not objectives' one-hot contraction: with O targets per position a one-hot would
    # be O times the size of the logits.
    target_logit_BxLxO = jnp.take_along_axis(logits_BxLxV, targets_BxLxO, axis=-1)
    cross_entropy_BxLxO = log_normalizer_BxL[..., None] - target_logit_BxLxO
    correct_BxLxO = jnp.argmax(logits_BxLxV, axis=-1)[..., None] == targets_BxLxO
    return {
        "loss_sum": jnp.sum(weights_BxLxO * cross_entropy_BxLxO),
        "z_loss_sum": jnp.sum(weights_BxLxO * z_loss_weight * jnp.square(log_normalizer_BxL)[..., None]),
        "correct_sum": jnp.sum(weights_BxLxO * correct_BxLxO),
        "weight_sum": jnp.sum(weights_BxLxO),
    }


def context_log_probs(params) -> jax.Array:
    """log p(c | w) [V, V] for every centre w (row) and context c (column): the model's softmax."""
    input_VxD = params["input_embed"]["embedding"].astype(jnp.float32)
    output_VxD = params["output_embed"]["embedding"].astype(jnp.float32)
    return jax.nn.log_softmax(input_VxD @ output_VxD.T, axis=-1)


def blank_scores(log_probs_VxV, log_prior_V, contexts_NxO, weights_NxO) -> jax.Array:
    """Scores [N, V] of every token w as the blank with the given contexts, by Bayes' rule under
    the skip-gram model (contexts independent given the centre):

        log p(w | contexts) = log p(w) + sum_c log p(c | w) + const.
    """
    N, V = contexts_NxO.shape[0], log_probs_VxV.shape[0]
    # How often each token is among each blank's contexts, then one matmul: no [N, O, V] gather.
    counts_NxV = jnp.zeros((N, V), jnp.float32).at[jnp.arange(N)[:, None], contexts_NxO].add(
        weights_NxO.astype(jnp.float32))
    return log_prior_V[None, :] + counts_NxV @ log_probs_VxV.T
