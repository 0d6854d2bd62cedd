"""Policy evaluation for post-training: sample answers, score them by the gold oracle and by the
reward model, measure KL to a reference policy, and win-rates between policies.

All scoring runs jitted in batches; prompts and responses are text, so any policy, reward model
or tokenizer of the project fits.
Few-shot in-context evaluation (lm-evaluation-harness style) is llm_jax/fewshot.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence

import jax
import numpy as np

from llm_jax import sampling, sharding, steps
from llm_jax.data import jsonl, post_training, tasks


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    batch_size: int = 64


def sample_responses(model, params, tokenizer, prompts: Sequence[str], settings: SamplingSettings, *, rng,
                     mesh=None) -> tuple[list[str], np.ndarray]:
    """One sampled response per prompt (text up to EOS) and its log-prob under the policy."""
    texts, logps = [], []
    for start in range(0, len(prompts), settings.batch_size):
        chunk = list(prompts[start:start + settings.batch_size])
        # A fixed batch shape (the last chunk padded with copies) keeps one compiled program.
        padded = chunk + [chunk[-1]] * (settings.batch_size - len(chunk))
        with sharding.mesh_context(mesh) if mesh is not None else contextlib.nullcontext():
            out = sampling.generate(model, params, [tokenizer.encode(p) for p in padded],
                                    max_new_tokens=settings.max_new_tokens, rng=jax.random.fold_in(rng, start),
                                    temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                                    greedy=settings.greedy, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        tokens_BxN, lengths_B, logprobs_BxN = (np.asarray(x) for x in out)
        for row in range(len(chunk)):
            generated = tokens_BxN[row, :lengths_B[row]].tolist()
            if generated and generated[-1] == tokenizer.eos_id:
                generated = generated[:-1]
            texts.append(tokenizer.decode(generated))
            logps.append(float(logprobs_BxN[row, :lengths_B[row]].sum()))
    return texts, np.asarray(logps, np.float32)


def _scoring_batches(tokenizer, prompts: Sequence[str], responses: Sequence[str], *, seq_len: int,
                     batch_size: int) -> list[dict]:
    """[B, 1, L] batches of prompt + response + EOS in order, `keep_end` truncation (never drops)."""
    examples = [jsonl.SFTExample(p, r) for p, r in zip(prompts, responses)]
    batches, _ = post_training.sft_eval_batches(examples, tokenizer, seq_len=seq_len, batch_size=batch_size,
                                                truncation="keep_end")
    return [{key: batch[key][:, None] for key in ("tokens", "mask", "loss_mask")} for batch in batches]


# One jitted scorer per model (modules are hashable dataclasses): repeated evaluations reuse it.
@functools.lru_cache(maxsize=16)
def jitted_logps_fn(model):
    """The jitted (params, batch of tokens/mask/loss_mask [B, K, L]) -> summed log-probs [B, K] of
    the loss-masked tokens (steps.make_reference_logps_fn), cached per model."""
    return jax.jit(steps.make_reference_logps_fn(model))


@functools.lru_cache(maxsize=16)
def _rewards_fn(model):
    return jax.jit(lambda params, batch: steps.response_rewards(model, params, batch, deterministic=True))


def score_logps(model, params, tokenizer, prompts, responses, *, seq_len: int, batch_size: int = 64) -> np.ndarray:
    """log p(response + EOS | prompt) under a policy, one float per example."""
    logps_fn = jitted_logps_fn(model)
    out = [np.asarray(logps_fn(params, batch))[:, 0]
           for batch in _scoring_batches(tokenizer, prompts, responses, seq_len=seq_len, batch_size=batch_size)]
    return np.concatenate(out)[:len(prompts)]


def score_rewards(reward_model, params, tokenizer, prompts, responses, *, seq_len: int,
                  batch_size: int = 64) -> np.ndarray:
    """The reward model's scalar for each (prompt, response)."""
    rewards_fn = _rewards_fn(reward_model)
    out = [np.asarray(rewards_fn(params, batch))[:, 0]
           for batch in _scoring_batches(tokenizer, prompts, responses, seq_len=seq_len, batch_size=batch_size)]
    return np.concatenate(out)[:len(prompts)]


def gold_scores(prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
    """Accuracy and mean gold reward (partial credit) of responses to the embedded tasks."""
    rewards = [tasks.gold_reward(p, r) for p, r in zip(prompts, responses)]
    correct = [tasks.is_correct(p, r) for p, r in zip(prompts, responses)]
    return {"gold_accuracy": float(np.mean(correct)), "gold_reward": float(np.mean(rewards))}


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Share of prompts where a's answer scores higher than b's; ties count half."""
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    return float(np.mean((a > b) + 0.5 * (a == b)))
