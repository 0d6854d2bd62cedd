"""Jit-compiled sampling from a decoder with a KV cache: prefill the prompts once, then one token
per step inside a `lax.while_loop`.

    out = generate(model, params, [[72, 105], [87, 104, 121]], max_new_tokens=64, rng=0,
                   temperature=0.8, top_p=0.95, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    out.tokens_BxN, out.lengths_B, out.logprobs_BxN

Prompts of different lengths are left-padded to one length P, so every row's last prompt token
sits in the same cache slot and each step writes one slot for all rows (one cheap
`dynamic_update_slice`). The model gives each token the position "number of real tokens before
it" (model.Transformer, decode=True), so padding shifts neither learned nor rotary positions, and
padding slots are never attended.

Compile cache: `generate_padded` is one `jax.jit`, compiled once per (model, batch size B, padded
prompt length P, max_new_tokens, greedy) and params sharding. Temperature, top-k, top-p, the
EOS / pad ids and the rng are traced, so changing them never recompiles. `generate` pads P up to
a multiple of `prompt_bucket` (64), so prompts of 1-64 tokens share one compile, 65-128 the next.
The cache is [B, P + max_new_tokens] from the start, so nothing recompiles per token (a loop whose
shapes grow per token compiles once per length: REFERENCE-FIGURES' 128 lengths ~ 160 s).

Sharded params: call inside `sharding.mesh_context(mesh)`; the model's logical constraints then
split the batch (and the cache) over the data axes, and the heads over `tensor`.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import model as model_lib


class SampleOutput(NamedTuple):
    tokens_BxN: jax.Array  # int32 generated tokens; pad_id after a row's EOS and after an early stop
    lengths_B: jax.Array  # int32 generated tokens per row, its EOS included
    logprobs_BxN: jax.Array  # float32 log p(token) under the unfiltered temperature-1 policy; 0 on padding


# --------------------------------------------------------------------------------------------
# Choosing a token (pure)
# --------------------------------------------------------------------------------------------

def filter_logits(logits_BxV, top_k, top_p):
    """Top-k, then top-p (nucleus) of what top-k kept (Hugging Face's order): every token outside
    gets -inf. `top_k <= 0` and `top_p >= 1` switch a filter off; the most likely token is always
    kept, and so are ties at the threshold. Both may be traced (one sort serves both), so changing
    them never recompiles."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    V = logits_BxV.shape[-1]
    rank_V = jnp.arange(V)
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)  # descending
    in_top_k_BxV = rank_V < jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    probs_BxV = jax.nn.softmax(jnp.where(in_top_k_BxV, sorted_BxV, -jnp.inf), axis=-1)
    # The nucleus is the shortest prefix whose mass reaches top_p: a token is in it when the mass
    # before it is still short. top_p >= 1 keeps everything even when the cumsum rounds to 1 early.
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    in_nucleus_BxV = (mass_before_BxV < top_p) | (top_p >= 1.0) | (rank_V == 0)
    num_kept_B = jnp.sum(in_top_k_BxV & in_nucleus_BxV, axis=-1)  # both are prefixes: so is their "and"
    threshold_Bx1 = jnp.take_along_axis(sorted_BxV, num_kept_B[:, None] - 1, axis=-1)
    return jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, -jnp.inf)


def sample_token(logits_BxV, rng, *, temperature, top_k, top_p, greedy: bool):
    """One token per row: argmax if `greedy`, else a draw from softmax(logits / temperature)
    restricted to `filter_logits`' top-k / top-p set (computed on the tempered logits)."""
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    tempered_BxV = logits_BxV.astype(jnp.float32) / temperature
    # The filter's sort over the vocabulary is the costliest op of a small model's decode step
    # (10% of it on CPU): skip it at run time when both filters are off.
    filtered_BxV = jax.lax.cond((top_k > 0) | (top_p < 1.0), lambda x: filter_logits(x, top_k, top_p),
                                lambda x: x, tempered_BxV)
    return jax.random.categorical(rng, filtered_BxV, axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# The decode loop (jitted)
# --------------------------------------------------------------------------------------------

def left_align(tokens_BxP, lengths_B):
    """Right-padded rows (real tokens first) -> left-padded rows and their mask, so that every
    row's last real token is in the last column."""
    P = tokens_BxP.shape[1]
    shift_B = P - lengths_B
    source_BxP = (jnp.arange(P)[None, :] - shift_B[:, None]) % P
    mask_BxP = jnp.arange(P)[None, :] >= shift_B[:, None]
    return jnp.take_along_axis(tokens_BxP, source_BxP, axis=1), mask_BxP


class _LoopState(NamedTuple):
    step: jax.Array  # the column the next token goes to
    cache: dict
    last_B: jax.Array  # the token emitted at step - 1, fed to the model next
    done_B: jax.Array  # the row has emitted EOS
    tokens_BxN: jax.Array
    logprobs_BxN: jax.Array
    lengths_B: jax.Array


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "greedy"))
def generate_padded(model: model_lib.Transformer, params, tokens_BxP, lengths_B, rng, *, max_new_tokens: int,
                    temperature=1.0, top_k=0, top_p=1.0, greedy: bool = False, eos_id=-1,
                    pad_id=0) -> SampleOutput:
    """`generate` on arrays: `tokens_BxP` right-padded (row b's prompt is tokens_BxP[b, :lengths_B[b]],
    each length >= 1), `eos_id=-1` for no EOS. Stops as soon as every row has emitted EOS."""
    B, P = tokens_BxP.shape
    N = max_new_tokens
    choose = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)

    def forward(cache, tokens_BxL, mask_BxL):
        logits_BxLxV, variables = model.apply({"params": params, "cache": cache}, tokens_BxL, mask_BxL=mask_BxL,
                                              decode=True, mutable=["cache"])
        return logits_BxLxV[:, -1], variables["cache"]

    def emit(state: _LoopState, logits_BxV) -> _LoopState:
        """Chooses the token of column `step`; rows already done get pad_id instead."""
        token_B = choose(logits_BxV, jax.random.fold_in(rng, state.step))
        logprob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV.astype(jnp.float32)), token_B[:, None],
                                        axis=-1)[:, 0]
        token_B = jnp.where(state.done_B, pad_id, token_B)
        logprob_B = jnp.where(state.done_B, 0.0, logprob_B)
        return state._replace(
            step=state.step + 1, last_B=token_B, done_B=state.done_B | (token_B == eos_id),
            tokens_BxN=jax.lax.dynamic_update_slice(state.tokens_BxN, token_B[:, None], (0, state.step)),
            logprobs_BxN=jax.lax.dynamic_update_slice(state.logprobs_BxN, logprob_B[:, None], (0, state.step)),
            lengths_B=state.lengths_B + ~state.done_B)

    def decode_step(state: _LoopState) -> _LoopState:
        # Finished rows keep feeding pad tokens: rows never see each other, and their output is pad.
        logits_BxV, cache = forward(state.cache, state.last_B[:, None], jnp.ones((B, 1), jnp.bool_))
        return emit(state._replace(cache=cache), logits_BxV)

    def running(state: _LoopState):
        return (state.step < N) & ~jnp.all(state.done_B)

    prompt_BxP, mask_BxP = left_align(tokens_BxP, lengths_B)
    logits_BxV, cache = forward(model_lib.init_cache(model, B, P + N), prompt_BxP, mask_BxP)
    state = _LoopState(step=jnp.zeros((), jnp.int32), cache=cache, last_B=jnp.zeros((B,), jnp.int32),
                       done_B=jnp.zeros((B,), jnp.bool_), tokens_BxN=jnp.full((B, N), pad_id, jnp.int32),
                       logprobs_BxN=jnp.zeros((B, N), jnp.float32), lengths_B=jnp.zeros((B,), jnp.int32))
    # Token 0 comes from the prefill; each loop step feeds the previous token and emits the next,
    # so N tokens cost N - 1 single-token forwards.
    state = jax.lax.while_loop(running, decode_step, emit(state, logits_BxV))
    return SampleOutput(state.tokens_BxN, state.lengths_B, state.logprobs_BxN)


# --------------------------------------------------------------------------------------------
# The host-side entry point
# --------------------------------------------------------------------------------------------

def prepare_prompts(prompts, *, pad_id: int, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """list[list[int]] or (tokens_BxP right-padded, lengths_B) -> (int32 tokens_BxP', int32
    lengths_B) with P' the longest prompt rounded up to a multiple of `bucket`, so that prompts
    of varied lengths reuse one compiled program."""
    if isinstance(prompts, tuple):
        tokens_BxP, lengths_B = (np.asarray(a, np.int32) for a in prompts)
    else:
        lengths_B = np.array([len(p) for p in prompts], np.int32)
        tokens_BxP = np.full((len(prompts), max(lengths_B, default=0)), pad_id, np.int32)
        for row, prompt in zip(tokens_BxP, prompts):
            row[:len(prompt)] = prompt
    if tokens_BxP.ndim != 2 or lengths_B.shape != tokens_BxP.shape[:1] or not len(lengths_B):
        raise ValueError(f"prompts: expected a non-empty batch, got tokens {tokens_BxP.shape} and lengths "
                         f"{lengths_B.shape}")
    if lengths_B.min() < 1 or lengths_B.max() > tokens_BxP.shape[1]:
        raise ValueError(f"prompt lengths must be in [1, {tokens_BxP.shape[1]}], got {lengths_B.tolist()} "
                         "(an unconditional sample starts from [eos_id])")
    P = -(-int(lengths_B.max()) // bucket) * bucket
    padded_BxP = np.full((len(lengths_B), P), pad_id, np.int32)
    width = min(P, tokens_BxP.shape[1])
    padded_BxP[:, :width] = tokens_BxP[:, :width]
    return padded_BxP, lengths_B


def generate(model: model_lib.Transformer, params, prompts: Sequence[Sequence[int]] | tuple, *,
             max_new_tokens: int, rng, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             greedy: bool = False, eos_id: int | None = None, pad_id: int = 0,
             prompt_bucket: int = 64) -> SampleOutput:
    """Samples `max_new_tokens` tokens after each prompt (fewer if every row emits `eos_id`).

    `prompts`: token lists of any lengths, or (tokens_BxP right-padded, lengths_B). `rng`: a JAX
    key or an int seed (same seed, same samples). `temperature` > 0 scales the logits before the
    `top_k` / `top_p` filters; `greedy` takes the argmax instead. The returned log-probs are
    those of the unfiltered, temperature-1 model (what DPO and online DPO need). With learned
    positions the longest prompt plus `max_new_tokens` must fit `model.cfg.max_len`.
    """
    cfg = model.cfg
    tokens_BxP, lengths_B = prepare_prompts(prompts, pad_id=pad_id, bucket=prompt_bucket)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if cfg.positions == "learned" and lengths_B.max() + max_new_tokens > cfg.max_len:
        raise ValueError(f"the longest prompt ({lengths_B.max()} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's learned positions (max_len {cfg.max_len})")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 (or greedy=True), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    return generate_padded(model, params, tokens_BxP, lengths_B, rng, max_new_tokens=max_new_tokens,
                           temperature=np.float32(temperature), top_k=np.int32(top_k), top_p=np.float32(top_p),
                           greedy=greedy, eos_id=np.int32(-1 if eos_id is None else eos_id),
                           pad_id=np.int32(pad_id))
