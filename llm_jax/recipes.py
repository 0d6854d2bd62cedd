"""What each task trains on and how: its data, its train and eval steps, its eval summary.

The loop (train.py) is the same for every task; a `Recipe` is the part that differs. Steps take
`(state, batch, *extras)` — `extras` carries what a task needs besides the batch, passed
explicitly to the jitted step (DPO's frozen reference parameters), never closed over.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax

from llm_jax import steps
from llm_jax.data import pipeline


@dataclasses.dataclass
class Recipe:
    train_step: Callable  # (state, batch, *extras) -> (state, metrics)
    eval_step: Callable  # (params, batch, *extras) -> sums
    summarize_eval: Callable[[dict], dict]  # host sums -> {"eval/...": float}
    make_train_iterator: Callable[[int, int], Any]  # (process_index, process_count) -> iterator
    make_eval_batches: Callable[[int, int], list]  # (process_index, process_count) -> host batches
    batch_keys: tuple[str, ...] = ("tokens", "mask")
    extras: tuple = ()
    extras_shardings: tuple = ()
    unigram_baseline: Callable[[], float] | None = None


def summarize_cross_entropy(sums: dict) -> dict[str, float]:
    weight = max(float(sums["weight_sum"]), 1.0)
    loss = float(sums["loss_sum"]) / weight
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)),
            "eval/accuracy": float(sums["correct_sum"]) / weight}


def pretraining_recipe(exp) -> Recipe:
    """Causal LM ("lm") or masked LM ("mlm") on a text corpus (data/pipeline.py)."""
    cfg = exp.config
    train_step = steps.make_train_step(exp.model, exp.tx, exp.schedule, task=cfg.task, token_info=exp.token_info,
                                       z_loss_weight=cfg.optimizer.z_loss,
                                       grad_accum_steps=cfg.optimizer.grad_accum_steps)
    eval_step = steps.make_eval_step(exp.model, task=cfg.task, token_info=exp.token_info, seed=cfg.seed)

    def make_train_iterator(process_index, process_count):
        return pipeline.make_train_iterator(cfg.data, exp.tokenizer, global_batch_size=cfg.data.batch_size,
                                            seed=cfg.seed, process_index=process_index,
                                            process_count=process_count)

    def make_eval_batches(process_index, process_count):
        return pipeline.make_eval_batches(cfg.data, exp.tokenizer, global_batch_size=cfg.data.batch_size,
                                          num_batches=cfg.train.eval_batches, process_index=process_index,
                                          process_count=process_count)

    baseline = (lambda: pipeline.unigram_baseline(cfg.data, exp.tokenizer)) if cfg.task == "lm" else None
    return Recipe(train_step, eval_step, summarize_cross_entropy, make_train_iterator, make_eval_batches,
                  unigram_baseline=baseline)


RECIPES: dict[str, Callable] = {"lm": pretraining_recipe, "mlm": pretraining_recipe}


def build_recipe(exp) -> Recipe:
    return RECIPES[exp.config.task](exp)
