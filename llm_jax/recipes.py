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
import numpy as np
from jax.experimental import multihost_utils

from llm_jax import checkpoint, sharding, steps
from llm_jax.data import jsonl, pipeline, post_training, tasks


@dataclasses.dataclass
class Recipe:
    train_step: Callable  # (state, batch, *extras) -> (state, metrics)
    eval_step: Callable  # (params, batch, *extras) -> sums
    summarize_eval: Callable[[dict], dict]  # host sums -> {"eval/...": float}
    make_train_iterator: Callable[[int, int], Any]  # (process_index, process_count) -> iterator
    make_eval_batches: Callable[[int, int], list]  # (process_index, process_count) -> host batches
    batch_keys: tuple[str, ...] = ("tokens", "mask")
    eval_batch_keys: tuple[str, ...] | None = None  # None -> batch_keys
    # Sequences the model processes per batch example (2 per DPO pair, K per ranking), for
    # tokens/s and MFU.
    sequences_per_example: int = 1
    extras: tuple = ()
    extras_shardings: tuple = ()
    # Figures about the data logged once at step 0 of a fresh run (unigram baseline, truncation).
    initial_metrics: Callable[[], dict[str, float]] = dict


def summarize_cross_entropy(sums: dict) -> dict[str, float]:
    weight = max(float(sums["weight_sum"]), 1.0)
    loss = float(sums["loss_sum"]) / weight
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)),
            "eval/accuracy": float(sums["correct_sum"]) / weight}


def pretraining_recipe(exp, abstract_state=None) -> Recipe:
    """Causal LM ("lm"), masked LM ("mlm") or skip-gram ("skipgram") on a text corpus (data/pipeline.py)."""
    del abstract_state
    cfg = exp.config
    options = dict(window=cfg.word2vec.window, eos_id=exp.tokenizer.eos_id) if cfg.task == "skipgram" else None
    train_step = steps.make_train_step(exp.model, exp.tx, exp.schedule, task=cfg.task, token_info=exp.token_info,
                                       z_loss_weight=cfg.optimizer.z_loss,
                                       grad_accum_steps=cfg.optimizer.grad_accum_steps, task_options=options)
    eval_step = steps.make_eval_step(exp.model, task=cfg.task, token_info=exp.token_info, seed=cfg.seed,
                                     task_options=options)

    def make_train_iterator(process_index, process_count):
        return pipeline.make_train_iterator(cfg.data, exp.tokenizer, global_batch_size=cfg.data.batch_size,
                                            seed=cfg.seed, process_index=process_index,
                                            process_count=process_count)

    def make_eval_batches(process_index, process_count):
        return pipeline.make_eval_batches(cfg.data, exp.tokenizer, global_batch_size=cfg.data.batch_size,
                                          num_batches=cfg.train.eval_batches, process_index=process_index,
                                          process_count=process_count)

    def initial_metrics():
        if cfg.task not in ("lm", "skipgram"):
            return {}
        # The loss of a model that knows only token frequencies: a trained LM must beat it by far,
        # and a skip-gram model beats it only as far as a token tells about its neighbours.
        return {"eval/unigram_baseline": pipeline.unigram_baseline(cfg.data, exp.tokenizer)}

    return Recipe(train_step, eval_step, summarize_cross_entropy, make_train_iterator, make_eval_batches,
                  initial_metrics=initial_metrics)


# --------------------------------------------------------------------------------------------
# Post-training data: JSONL files, or the embedded verifiable tasks
# --------------------------------------------------------------------------------------------

def _task_names(data_cfg) -> list[str]:
    names = [name.strip() for name in data_cfg.tasks.split(",") if name.strip()]
    unknown = sorted(set(names) - set(tasks.TASKS))
    if unknown or not names:
        raise ValueError(f"data.tasks must name some of {tasks.TASKS}, got {data_cfg.tasks!r}")
    return names


def task_examples(data_cfg, split: str, seed: int) -> list[tasks.TaskExample]:
    n = data_cfg.num_examples if split == "train" else data_cfg.num_eval_examples
    return tasks.make_examples(_task_names(data_cfg), n, seed, split=split)


def sft_examples(data_cfg, split: str, seed: int) -> list[jsonl.SFTExample]:
    path = data_cfg.train_file if split == "train" else data_cfg.eval_file
    if path:
        return jsonl.read_sft(path)
    return [jsonl.SFTExample(e.prompt, e.answer) for e in task_examples(data_cfg, split, seed)]


def simulated_rankings(data_cfg, split: str, seed: int) -> list[jsonl.RankingExample]:
    """Before any policy exists to sample from: the right answer and K-1 corrupted ones per
    prompt, ranked by the simulated annotator (noisy, as human raters are)."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    examples = []
    for example in task_examples(data_cfg, split, seed):
        responses = [example.answer] + tasks.perturbed_answers(example, data_cfg.max_responses - 1, rng=rng)
        ranking = tasks.annotate(example.prompt, responses, noise=data_cfg.annotator_noise, rng=rng)
        examples.append(jsonl.RankingExample(example.prompt, responses, ranking))
    return examples


def _file_format(path: str) -> str:
    """'preferences' or 'rankings', from the first record's keys."""
    return "rankings" if "responses" in jsonl.first_record(path) else "preferences"


def ranking_examples(data_cfg, split: str, seed: int) -> list[jsonl.RankingExample]:
    """Rankings for the reward model; pair files become K = 2 rankings."""
    path = data_cfg.train_file if split == "train" else data_cfg.eval_file
    if not path:
        return simulated_rankings(data_cfg, split, seed)
    if _file_format(path) == "rankings":
        return jsonl.read_rankings(path)
    return [jsonl.RankingExample(p.prompt, [p.chosen, p.rejected], [0, 1]) for p in jsonl.read_preferences(path)]


def preference_examples(config, split: str) -> list[jsonl.PreferenceExample]:
    """Pairs for DPO; ranking files (and the simulated rankings) become pairs by `dpo.pairs`."""
    data_cfg = config.data
    path = data_cfg.train_file if split == "train" else data_cfg.eval_file
    if path and _file_format(path) == "preferences":
        return jsonl.read_preferences(path)
    return post_training.rankings_to_preferences(ranking_examples(data_cfg, split, config.seed),
                                                 pairs=config.dpo.pairs)


def _first(batches: list, num_batches: int) -> list:
    return batches if num_batches == 0 else batches[:num_batches]


def _truncation_metrics(stats: post_training.TruncationStats) -> dict[str, float]:
    return {f"data/{key}": float(value) for key, value in dataclasses.asdict(stats).items()}


def sft_recipe(exp, abstract_state) -> Recipe:
    """Instruction tuning: the causal LM loss on response tokens only."""
    del abstract_state
    cfg = exp.config
    train_examples = sft_examples(cfg.data, "train", cfg.seed)
    eval_examples = sft_examples(cfg.data, "eval", cfg.seed)
    stats = {}

    def make_train_iterator(process_index, process_count):
        iterator, stats["train"] = post_training.sft_batches(
            train_examples, exp.tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, seed=cfg.seed,
            truncation=cfg.data.truncation, pack=cfg.data.pack, process_index=process_index,
            process_count=process_count)
        return iterator

    def make_eval_batches(process_index, process_count):
        batches, _ = post_training.sft_eval_batches(
            eval_examples, exp.tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
            truncation=cfg.data.truncation, process_index=process_index, process_count=process_count)
        return _first(batches, cfg.train.eval_batches)

    keys = ("tokens", "mask", "loss_mask") + (("segment_ids", "positions") if cfg.data.pack else ())
    return Recipe(
        steps.make_train_step(exp.model, exp.tx, exp.schedule, task="sft", token_info=exp.token_info,
                              z_loss_weight=cfg.optimizer.z_loss, grad_accum_steps=cfg.optimizer.grad_accum_steps),
        steps.make_eval_step(exp.model, task="sft", token_info=exp.token_info),
        summarize_cross_entropy, make_train_iterator, make_eval_batches, batch_keys=keys,
        eval_batch_keys=("tokens", "mask", "loss_mask"),  # eval rows are never packed
        initial_metrics=lambda: _truncation_metrics(stats["train"]))


def reward_recipe(exp, abstract_state) -> Recipe:
    """Bradley-Terry reward model on K-way rankings (every ordered pair, InstructGPT-weighted)."""
    del abstract_state
    cfg = exp.config
    train_examples = ranking_examples(cfg.data, "train", cfg.seed)
    eval_examples = ranking_examples(cfg.data, "eval", cfg.seed)
    stats = {}
    common = dict(seq_len=cfg.data.seq_len, max_responses=cfg.data.max_responses, truncation=cfg.data.truncation)

    def make_train_iterator(process_index, process_count):
        iterator, stats["train"] = post_training.ranking_batches(
            train_examples, exp.tokenizer, prompts_per_batch=cfg.data.batch_size, seed=cfg.seed,
            process_index=process_index, process_count=process_count, **common)
        return iterator

    def make_eval_batches(process_index, process_count):
        batches, _ = post_training.ranking_eval_batches(
            eval_examples, exp.tokenizer, prompts_per_batch=cfg.data.batch_size, process_index=process_index,
            process_count=process_count, **common)
        return _first(batches, cfg.train.eval_batches)

    return Recipe(
        steps.make_reward_train_step(exp.model, exp.tx, exp.schedule, margin=cfg.reward.margin),
        steps.make_reward_eval_step(exp.model, margin=cfg.reward.margin),
        steps.summarize_reward_sums, make_train_iterator, make_eval_batches,
        batch_keys=("tokens", "mask", "loss_mask", "ranks", "valid"), sequences_per_example=cfg.data.max_responses,
        initial_metrics=lambda: _truncation_metrics(stats["train"]))


def dpo_settings(config) -> steps.DPOSettings:
    return steps.DPOSettings(beta=config.dpo.beta, loss_type=config.dpo.loss_type,
                             label_smoothing=config.dpo.label_smoothing, reference_free=config.dpo.reference_free,
                             rpo_alpha=config.dpo.rpo_alpha,
                             cached_reference=config.dpo.reference == "cached")


def reference_params(config, abstract_params):
    """The frozen reference model of DPO: by default the model training starts from (SFT)."""
    path = config.dpo.reference_from or config.train.init_from
    field = "dpo.reference_from" if config.dpo.reference_from else "train.init_from"
    return checkpoint.restore_params(path, abstract_params, field=field)


def jit_reference_logps(model, mesh, param_shardings):
    """(params, batch) -> log-probs [B, 2] of each pair's responses, jitted once per model."""
    return jax.jit(steps.make_reference_logps_fn(model),
                   in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def cache_reference_logps(logps_fn, params, examples, tokenizer, *, config, mesh) -> np.ndarray:
    """Log-probs [num_pairs, 2] of every (encoded) pair under the reference, computed once."""
    batches, _ = post_training.preference_eval_batches(
        examples, tokenizer, seq_len=config.data.seq_len, batch_size=config.data.batch_size,
        truncation=config.data.truncation, process_index=jax.process_index(), process_count=jax.process_count())
    batch_sharding = sharding.batch_sharding(mesh)
    logps, valid = [], []
    with sharding.mesh_context(mesh):
        for batch in batches:
            global_batch = sharding.shard_host_batch({k: batch[k] for k in ("tokens", "mask", "loss_mask")},
                                                     batch_sharding)
            logps.append(np.asarray(logps_fn(params, global_batch)))
            # Every process keeps the whole table: its rows of each batch are only a block.
            valid.append(multihost_utils.process_allgather(batch["valid"], tiled=True))
    return np.concatenate(logps)[np.concatenate(valid).astype(bool)]


def dpo_recipe(exp, abstract_state) -> Recipe:
    """DPO against a frozen reference: cached log-probs by default, or the reference run per step."""
    cfg = exp.config
    settings = dpo_settings(cfg)
    train_examples = preference_examples(cfg, "train")
    eval_examples = preference_examples(cfg, "eval")
    param_shardings = jax.tree.map(lambda a: a.sharding, abstract_state.params)
    reference = None if settings.reference_free else reference_params(cfg, abstract_state.params)
    tables = {"train": None, "eval": None}
    if settings.cached_reference and reference is not None:
        logps_fn = jit_reference_logps(exp.model, exp.mesh, param_shardings)
        for split, examples in (("train", train_examples), ("eval", eval_examples)):
            tables[split] = cache_reference_logps(logps_fn, reference, examples, exp.tokenizer, config=cfg,
                                                  mesh=exp.mesh)
        reference = None  # not needed any more: free its memory
    stats = {}
    common = dict(seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, truncation=cfg.data.truncation)

    def make_train_iterator(process_index, process_count):
        iterator, stats["train"] = post_training.preference_batches(
            train_examples, exp.tokenizer, seed=cfg.seed, process_index=process_index, process_count=process_count,
            reference_logps=tables["train"], **common)
        return iterator

    def make_eval_batches(process_index, process_count):
        batches, _ = post_training.preference_eval_batches(
            eval_examples, exp.tokenizer, process_index=process_index, process_count=process_count,
            reference_logps=tables["eval"], **common)
        return _first(batches, cfg.train.eval_batches)

    extras = (reference,) if reference is not None else ()
    keys = ("tokens", "mask", "loss_mask", "valid") + (("reference_logps",) if tables["train"] is not None else ())
    return Recipe(
        steps.make_dpo_train_step(exp.model, exp.tx, exp.schedule, settings),
        steps.make_dpo_eval_step(exp.model, settings),
        lambda sums: steps.summarize_preference_sums(sums, "eval"), make_train_iterator, make_eval_batches,
        batch_keys=keys, extras=extras, extras_shardings=(param_shardings,) if extras else (), sequences_per_example=2,
        initial_metrics=lambda: _truncation_metrics(stats["train"]))


RECIPES: dict[str, Callable] = {"lm": pretraining_recipe, "mlm": pretraining_recipe, "sft": sft_recipe,
                                "reward": reward_recipe, "dpo": dpo_recipe, "skipgram": pretraining_recipe}


def build_recipe(exp, abstract_state=None) -> Recipe:
    """`abstract_state` (shapes and shardings) lets a recipe load extra models (DPO's reference)."""
    return RECIPES[exp.config.task](exp, abstract_state)
