"""The one training loop, shared by every task: restore-or-init, step, log, eval, checkpoint.

    state = restore(workdir) or sharded_init()
    for step: batch -> train_step (jitted once, explicit shardings, donated state)
              every log_every: metrics of the previous dispatch are read, so the host never
                               waits for the step it just launched
              every eval_every: held-out loss / perplexity
              every checkpoint_every: state + data-iterator position
"""
from __future__ import annotations

import dataclasses
import json
import os
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn

from llm_jax import checkpoint, config_lib, metrics, optimizer, preemption, recipes, sharding, steps
from llm_jax import model as model_lib
from llm_jax.data import tokenizer as tokenizer_lib


def maybe_initialize_distributed(dist_cfg) -> None:
    """jax.distributed.initialize() for multi-host runs; on TPU VMs and SLURM/Open MPI clusters
    it discovers the coordinator and process ids by itself, so every field may stay unset."""
    if not dist_cfg.initialize:
        return
    kwargs = {}
    if dist_cfg.coordinator_address:
        kwargs["coordinator_address"] = dist_cfg.coordinator_address
    if dist_cfg.num_processes > 0:
        kwargs["num_processes"] = dist_cfg.num_processes
    if dist_cfg.process_id >= 0:
        kwargs["process_id"] = dist_cfg.process_id
    jax.distributed.initialize(**kwargs)


@dataclasses.dataclass
class Experiment:
    """Everything the loop needs that follows from the config, built once."""

    config: object
    tokenizer: object
    model_cfg: model_lib.TransformerConfig
    model: model_lib.Transformer
    mesh: jax.sharding.Mesh
    tx: object
    schedule: object
    token_info: steps.TokenInfo


def model_config(config, vocab_size: int) -> model_lib.TransformerConfig:
    """The run's model: config.model over the tokenizer's vocabulary; a reward model is the same
    transformer with a scalar head instead of the vocabulary."""
    head = "scalar" if config.task == "reward" else "lm"
    return model_lib.TransformerConfig.from_config(config.model, vocab_size, config.data.seq_len, head=head)


def build_experiment(config, *, devices=None) -> Experiment:
    devices = jax.devices() if devices is None else devices
    config_lib.validate(config, num_devices=len(devices), process_count=jax.process_count())
    tokenizer = tokenizer_lib.get_tokenizer(config.data.tokenizer, config.data.tokenizer_path)
    if config.task == "mlm" and tokenizer.mask_id < 0:
        raise ValueError(f"task='mlm' needs a mask token, and data.tokenizer_path={config.data.tokenizer_path!r} "
                         f"has none")
    model_cfg = model_config(config, tokenizer.vocab_size)
    mesh = sharding.make_mesh(config.mesh, devices)
    if model_cfg.vocab_size % mesh.shape["tensor"]:
        raise ValueError(f"model.vocab_size / model.vocab_multiple must make the vocabulary ({model_cfg.vocab_size}) "
                         f"divisible by mesh.tensor ({mesh.shape['tensor']})")
    tx, schedule = optimizer.make_optimizer(config.optimizer, total_steps=config.train.num_steps)
    token_info = steps.TokenInfo(vocab_size=tokenizer.vocab_size, mask_id=tokenizer.mask_id,
                                 num_special=tokenizer.num_special)
    return Experiment(config, tokenizer, model_cfg, model_lib.make_model(model_cfg), mesh, tx, schedule, token_info)


def check_vocabularies(cfg, tokenizer, workdir: str, *, write: bool) -> None:
    """This run's vocabulary must be that of every run it takes weights from (its own checkpoints,
    `train.init_from`, the DPO reference); then it is recorded in the workdir for later runs."""
    vocabulary = tokenizer_lib.fingerprint(cfg.data.tokenizer, cfg.data.tokenizer_path, tokenizer)
    sources = [("resume", workdir if config_lib.holds_checkpoints(workdir) else ""),
               ("train.init_from", cfg.train.init_from)]
    if cfg.task in ("dpo", "online_dpo"):
        sources.append(("dpo.reference_from", cfg.dpo.reference_from))
    for field, path in sources:
        if path:
            checkpoint.check_vocabulary(path, vocabulary, field=field)
    if write:
        checkpoint.write_vocabulary(workdir, vocabulary)


def _init_boxed_params(model, seq_len, rng):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return model.init(rng, tokens, deterministic=True)["params"]


def state_shardings_and_init(exp: Experiment, seed: int):
    """(abstract state with shardings, init function) for sharded initialisation.

    The shapes come from `jax.eval_shape`, the shardings from the parameters' logical axis names,
    and `jax.jit(init, out_shardings=...)` materialises each shard directly on its device: the
    full model never exists on one device.
    """
    seq_len = exp.config.data.seq_len
    rng = jax.random.PRNGKey(seed)
    params_rng, state_rng = jax.random.split(rng)
    init_params = functools.partial(_init_boxed_params, exp.model, seq_len)
    boxed = jax.eval_shape(init_params, params_rng)
    param_shardings = sharding.logical_shardings(boxed, exp.mesh)

    def init_state(key):
        params = nn.unbox(init_params(key))
        return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=exp.tx.init(params), rng=state_rng)

    abstract = jax.eval_shape(init_state, params_rng)
    shardings = steps.TrainState(
        step=sharding.replicated(exp.mesh), params=param_shardings,
        opt_state=sharding.optimizer_state_shardings(exp.tx, abstract.opt_state, param_shardings, exp.mesh),
        rng=sharding.replicated(exp.mesh))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    init = jax.jit(init_state, out_shardings=shardings)
    return abstract, shardings, lambda: init(params_rng)


def compile_steps(exp: Experiment, state_shardings, recipe: recipes.Recipe | None = None):
    """The recipe's train and eval steps, jitted with explicit shardings: the state as
    initialised, every batch array split over the data-parallel axes along its first dimension,
    the extras (e.g. a frozen reference model) as the recipe says; the state is donated."""
    recipe = recipe or recipes.build_recipe(exp)
    batch_sharding = sharding.batch_sharding(exp.mesh)
    batch_shardings = {key: batch_sharding for key in recipe.batch_keys}
    eval_batch_shardings = {key: batch_sharding for key in recipe.eval_batch_keys or recipe.batch_keys}
    replicated = sharding.replicated(exp.mesh)
    train_step = jax.jit(recipe.train_step,
                         in_shardings=(state_shardings, batch_shardings, *recipe.extras_shardings),
                         out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    eval_step = jax.jit(recipe.eval_step,
                        in_shardings=(state_shardings.params, eval_batch_shardings, *recipe.extras_shardings),
                        out_shardings=replicated)
    return train_step, eval_step, batch_sharding


def evaluate(eval_step, params, eval_batches, extras=()) -> dict:
    """Adds up the eval step's sums over the eval set (on device, fetched once)."""
    totals = None
    for batch in eval_batches:
        sums = eval_step(params, batch, *extras)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return jax.device_get(totals)


# Heads a run may add on top of the checkpoint it starts from; they keep their fresh init.
NEW_HEADS = ("reward_head",)
# Heads a checkpoint may lack: a BertModel imported from Hugging Face (convert.py) has no MLM head.
MLM_HEADS = ("mlm_transform", "mlm_norm", "mlm_bias")


def params_from(path: str, init_params, abstract_params):
    """`train.init_from`: every parameter from the checkpoint, except heads this model adds (a
    reward model started from an SFT model gets a fresh scalar head) or the checkpoint lacks."""
    names = [name for name in abstract_params if name not in NEW_HEADS]
    restored = checkpoint.restore_params(path, {name: abstract_params[name] for name in names}, optional=MLM_HEADS)
    return {**init_params, **restored}


def check_finite(step: int, scalars: dict, max_skips: int) -> None:
    """Stops on a non-finite loss or gradient norm, unless the optimizer skipped that step
    (`optimizer.skip_nonfinite_steps` > 0: the parameters did not change) and has not yet given up."""
    consecutive = int(scalars.get("train/consecutive_skips", 0))
    if consecutive > max_skips:  # apply_if_finite accepted the update: the parameters are suspect
        raise FloatingPointError(f"{consecutive} steps in a row up to step {step} had a non-finite gradient, more than "
                                 f"optimizer.skip_nonfinite_steps ({max_skips}); the last good checkpoint is kept")
    if consecutive:
        return
    loss = scalars["train/loss"]
    if not np.isfinite(loss) or not np.isfinite(scalars["train/grad_norm"]):
        raise FloatingPointError(f"non-finite loss ({loss}) or grad norm ({scalars['train/grad_norm']}) at step "
                                 f"{step}; the last good checkpoint is kept (optimizer.skip_nonfinite_steps > 0 "
                                 f"skips such steps instead)")


class NumericsMonitor:
    """Reads each logged step's scalars for trouble: stops on non-finite values (`check_finite`),
    reports steps the optimizer skipped since the last log, and reports loss spikes (a loss above
    `spike_factor` times the running mean of the logged losses), each on stderr and as a metric."""

    def __init__(self, *, max_skips: int, spike_factor: float, skipped_before: int, report):
        self.max_skips = max_skips
        self.spike_factor = spike_factor
        self.skipped = skipped_before
        self.report = report
        self.mean_loss = None
        self.last_step = None

    def check(self, step: int, scalars: dict) -> None:
        """Raises FloatingPointError, or adds `train/loss_spike` to `scalars` and reports."""
        check_finite(step, scalars, self.max_skips)
        since = f"since step {self.last_step}" if self.last_step is not None else "so far"
        self.last_step = step
        skipped = int(scalars.get("train/skipped_steps", self.skipped))
        if skipped > self.skipped:
            this_one = " (including this one)" if scalars.get("train/consecutive_skips", 0) else ""
            self.report(f"step {step}: {skipped - self.skipped} step(s) {since}{this_one} had a non-finite loss or "
                        f"gradient and were skipped; {skipped} in all")
            self.skipped = skipped
        loss = scalars["train/loss"]
        if not np.isfinite(loss):
            return
        if self.spike_factor and self.mean_loss is not None and self.mean_loss > 0 \
                and loss > self.spike_factor * self.mean_loss:
            scalars["train/loss_spike"] = loss / self.mean_loss
            self.report(f"step {step}: loss spike, {loss:.4g} is {loss / self.mean_loss:.1f}x the running mean "
                        f"{self.mean_loss:.4g}")
        # An exponential mean over the logged losses: it follows the downward trend of training,
        # so a spike is judged against the recent level, not against the start of the run.
        self.mean_loss = loss if self.mean_loss is None else 0.9 * self.mean_loss + 0.1 * loss


def _fetch(device_metrics) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(device_metrics).items()}


def _skipped_steps(state) -> int:
    """Steps skipped for non-finite gradients so far (restored with the optimizer state)."""
    opt_state = state.opt_state
    return int(jax.device_get(opt_state.total_notfinite)) if isinstance(opt_state, optax.ApplyIfFiniteState) else 0


def _reporter(progress, show_progress: bool):
    """Warnings for the user: a line of their own under the live progress line, or the absl log
    (stderr at the default verbosity) when there is none."""
    def report(message: str) -> None:
        if show_progress:
            progress.write(f"warning: {message}")
        else:
            logging.warning(message)
    return report


def restore_or_init(cfg, exp: Experiment, manager, abstract_state, init_state, data_iterator):
    """(state, step restored or None): the workdir's newest usable checkpoint (state and data
    position; damaged newer ones are reported and set aside) if there is one; otherwise a fresh
    sharded init, with the parameters of `train.init_from` when it is set."""
    with sharding.mesh_context(exp.mesh):
        step, restored = checkpoint.restore_latest(manager, abstract_state, data_iterator)
        if step is not None:
            logging.info("resuming at step %d", step)
            return restored["state"], step
        state = init_state()
        if cfg.train.init_from:
            state = state.replace(params=params_from(cfg.train.init_from, state.params, abstract_state.params))
        return state, None


def run(config, workdir: str) -> dict[str, float]:
    """Trains until `train.num_steps`, resuming from `workdir` if it holds checkpoints.
    Returns the last logged train and eval metrics."""
    maybe_initialize_distributed(config.distributed)
    exp = build_experiment(config)
    cfg, is_primary = config, jax.process_index() == 0
    config_lib.check_or_write_workdir_config(cfg, workdir, write=is_primary)
    check_vocabularies(cfg, exp.tokenizer, workdir, write=is_primary)

    abstract_state, state_shardings, init_state = state_shardings_and_init(exp, cfg.seed)
    recipe = recipes.build_recipe(exp, abstract_state)
    train_step, eval_step, batch_sharding = compile_steps(exp, state_shardings, recipe)
    process_index, process_count = jax.process_index(), jax.process_count()
    train_iter = recipe.make_train_iterator(process_index, process_count)
    eval_batches = [sharding.shard_host_batch(b, batch_sharding)
                    for b in recipe.make_eval_batches(process_index, process_count)]

    manager = checkpoint.make_manager(workdir, keep=cfg.train.keep_checkpoints)
    state, latest = restore_or_init(cfg, exp, manager, abstract_state, init_state, train_iter)
    start_step = int(jax.device_get(state.step))

    counts = model_lib.parameter_counts(state.params)
    flops_per_token = metrics.flops_per_token(exp.model_cfg, cfg.data.seq_len)
    peak, peak_source = metrics.peak_flops_per_device(jax.devices()[0], dtype=exp.model_cfg.dtype,
                                                      override=cfg.train.peak_flops_per_device)
    tokens_per_step = cfg.data.batch_size * recipe.sequences_per_example * cfg.data.seq_len
    if is_primary:
        print(f"model: {counts['total']:,} parameters ({counts['non_embedding']:,} non-embedding); "
              f"{flops_per_token / 1e6:.2f} MFLOPs/token; mesh {dict(exp.mesh.shape)}; "
              f"peak {peak / 1e9:.1f} GFLOP/s per device ({peak_source})")
        print(f"workdir {workdir}: metrics {workdir}/metrics.jsonl, checkpoints {workdir}/checkpoints, "
              f"TensorBoard {workdir}/tensorboard" + (f"; resuming at step {start_step}" if start_step else ""))

    # A fresh start drops every line of an earlier attempt in this workdir (one killed before its
    # first checkpoint, or whose checkpoints were all unusable), so each step is logged once.
    writer = metrics.MetricsWriter(workdir, enabled=is_primary, resume_step=start_step if latest is not None else -1)
    if is_primary and latest is None:
        initial = recipe.initial_metrics()
        if initial:
            writer.write(0, initial)
            print("data: " + ", ".join(f"{k} = {v:.4g}" for k, v in initial.items()))
    progress = metrics.Progress(cfg.train.num_steps, start_step=start_step, enabled=is_primary and cfg.train.progress)
    last: dict[str, float] = {}
    pending = None  # (step, device metrics) dispatched but not read yet
    timer = None  # (step, time) at the last measurement point, after compilation
    max_skips = cfg.optimizer.skip_nonfinite_steps
    monitor = NumericsMonitor(max_skips=max_skips, spike_factor=cfg.train.loss_spike_factor,
                              skipped_before=_skipped_steps(state),
                              report=_reporter(progress, is_primary and cfg.train.progress))

    def log(step, device_metrics):
        nonlocal timer
        scalars = _fetch(device_metrics)
        monitor.check(step, scalars)
        now = time.perf_counter()
        if timer is not None and step > timer[0]:
            tokens_per_sec = (step - timer[0]) * tokens_per_step / (now - timer[1])
            scalars["train/tokens_per_sec"] = tokens_per_sec
            scalars["train/step_time"] = (now - timer[1]) / (step - timer[0])
            scalars["train/mfu"] = metrics.mfu(tokens_per_sec, flops_per_token, peak, jax.device_count())
        timer = (step, now)
        scalars["train/tokens_seen"] = step * tokens_per_step
        writer.write(step, scalars)
        progress.update(step, loss=scalars["train/loss"], tokens_per_sec=scalars.get("train/tokens_per_sec"))
        last.update(scalars)

    def flush():
        """Reads the pending metrics now (before eval, checkpoints and the end)."""
        nonlocal pending
        if pending is not None:
            log(*pending)
            pending = None

    def save_checked(step, state, step_metrics, is_log_step):
        """Checkpoints `step`, never a state whose loss was not checked: a logged step's by its
        pending metrics, another's here."""
        flush()
        if not is_log_step:
            check_finite(step, _fetch(step_metrics), max_skips)
        checkpoint.save(manager, step, state, train_iter)

    preempted = None
    with preemption.StopSignals() as signals, sharding.mesh_context(exp.mesh):
        for step in range(start_step + 1, cfg.train.num_steps + 1):
            batch = sharding.shard_host_batch(next(train_iter), batch_sharding)
            state, step_metrics = train_step(state, batch, *recipe.extras)
            flush()  # the previous step's metrics, read while this step runs
            if timer is None:  # the first step includes compilation: time from its end
                jax.block_until_ready(step_metrics)
                timer = (step, time.perf_counter())
            is_log_step = step % cfg.train.log_every == 0 or step == cfg.train.num_steps
            if is_log_step:
                pending = (step, step_metrics)
            if step % cfg.train.eval_every == 0 or step == cfg.train.num_steps:
                flush()
                eval_metrics = recipe.summarize_eval(evaluate(eval_step, state.params, eval_batches, recipe.extras))
                writer.write(step, eval_metrics)
                last.update(eval_metrics)
                if is_primary:
                    progress.write(f"step {step}: " + ", ".join(
                        f"{key.removeprefix('eval/')} {value:.4f}" for key, value in eval_metrics.items()))
                timer = (step, time.perf_counter())  # throughput counts training time only
            is_checkpoint_step = step % cfg.train.checkpoint_every == 0 or step == cfg.train.num_steps
            if is_checkpoint_step:
                save_checked(step, state, step_metrics, is_log_step)
                timer = (step, time.perf_counter())
            # A stop signal is honoured between steps: save this step, then stop. Several processes
            # agree at log steps (one all-gather), so they all save the same step.
            if step < cfg.train.num_steps and (process_count == 1 or step % cfg.train.log_every == 0):
                stop = signals.agreed(process_count)
                if stop:
                    if not is_checkpoint_step:  # else saved just above
                        save_checked(step, state, step_metrics, is_log_step)
                    preempted = preemption.Preempted(step, stop)
                    break
        flush()
    progress.close()
    writer.close()
    manager.close()
    if preempted is not None:
        raise preempted
    return last


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config: its config.json merged onto `base_config()`, so keys added to the
    skeleton since the run was trained take their defaults."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--workdir: {path} not found; is {workdir} a training run's workdir?")
    with open(path) as f:
        saved = ml_collections.ConfigDict(json.load(f))
    config = config_lib.base_config()
    config.update(saved)
    return config


def load_run(workdir: str):
    """(experiment, params) of the newest checkpoint, sharded as the training loop shards them
    (without an MLM head if it has none: an imported BertModel)."""
    config = load_config(workdir)
    exp = build_experiment(config)
    abstract_params = state_shardings_and_init(exp, config.seed)[0].params
    return exp, checkpoint.restore_params(workdir, abstract_params, field="--workdir", optional=MLM_HEADS)
