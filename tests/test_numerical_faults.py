"""Numerical faults: a NaN loss stops the run naming the step and keeps the last good checkpoint,
or (optimizer.skip_nonfinite_steps) the step is skipped and reported; loss spikes are reported."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import checkpoint, metrics, sharding, steps, train


@pytest.fixture
def loop_config(tiny_config, text_corpus, tmp_path):
    return tiny_config(**{"data.dataset": "files", "data.files": text_corpus, "data.tfds_data_dir": str(tmp_path / "tfds"),
                          "data.validation_fraction": 0.2})


def poison_steps(monkeypatch, config, bad_steps):
    """Makes the loss of `bad_steps` NaN: those batches carry the mask id (never in LM data) at
    [0, 0], and the LM task turns such a batch's weights into NaN."""
    real_task, real_shard = steps.TASKS["lm"], sharding.shard_host_batch
    calls = []

    def poisoned_task(batch, rng, token_info):
        inputs, targets, weights = real_task(batch, rng, token_info)
        poisoned = batch["tokens"][0, 0] == token_info.mask_id
        return inputs, targets, weights * jnp.where(poisoned, jnp.nan, 1.0)

    def shard(batch, batch_sharding):
        calls.append(1)
        step = len(calls) - config.train.eval_batches  # eval batches are placed first, once
        if step in bad_steps:
            batch = {**batch, "tokens": batch["tokens"].copy()}
            batch["tokens"][0, 0] = 2  # the byte tokenizer's [MASK]
        return real_shard(batch, batch_sharding)

    monkeypatch.setitem(steps.TASKS, "lm", poisoned_task)
    monkeypatch.setattr(sharding, "shard_host_batch", shard)


def logged_steps(workdir):
    return [r["step"] for r in metrics.read_metrics(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]


def test_mask_id_is_the_poison_token(loop_config):
    assert train.build_experiment(loop_config).token_info.mask_id == 2


@pytest.mark.parametrize("log_every", [1, 2])
def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(loop_config, tmp_path, monkeypatch, log_every):
    # log_every=2: step 3 is not logged but is a checkpoint step, so it is checked before the save.
    loop_config.train.log_every = log_every
    workdir = str(tmp_path / "run")
    poison_steps(monkeypatch, loop_config, bad_steps={3})
    with pytest.raises(FloatingPointError, match="at step 3; the last good checkpoint is kept"):
        train.run(loop_config, workdir)
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "3"))
    assert max(logged_steps(workdir)) < 3


def test_skipped_nan_steps_leave_the_parameters_and_are_reported(loop_config, tmp_path, monkeypatch, caplog):
    loop_config.optimizer.skip_nonfinite_steps = 2
    loop_config.train.checkpoint_every = 1
    loop_config.train.keep_checkpoints = 10
    workdir = str(tmp_path / "run")
    poison_steps(monkeypatch, loop_config, bad_steps={4})
    train.run(loop_config, workdir)
    rows = {r["step"]: r for r in metrics.read_metrics(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r}
    assert rows[4]["train/loss"] is None and rows[4]["train/skipped_steps"] == 1
    assert rows[3]["train/skipped_steps"] == 0 and rows[6]["train/skipped_steps"] == 1
    assert rows[5]["train/consecutive_skips"] == 0 and np.isfinite(rows[6]["train/loss"])
    # train.progress is off in tests, so the warning goes to the absl log.
    assert "step 4: 1 step(s) since step 3 (including this one) had a non-finite loss" in caplog.text

    exp = train.build_experiment(loop_config)
    abstract = train.state_shardings_and_init(exp, loop_config.seed)[0]
    manager = checkpoint.make_manager(workdir, keep=10)
    params = {s: jax.device_get(checkpoint.restore(manager, s, abstract, None).params) for s in (3, 4, 5)}
    manager.close()
    same = jax.tree.map(np.array_equal, params[3], params[4])
    assert all(jax.tree.leaves(same))  # the skipped step changed nothing
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, params[4], params[5])))


def test_too_many_skips_in_a_row_stop_the_run(loop_config, tmp_path, monkeypatch):
    loop_config.optimizer.skip_nonfinite_steps = 1
    poison_steps(monkeypatch, loop_config, bad_steps={2, 3})
    with pytest.raises(FloatingPointError, match="2 steps in a row up to step 3 had a non-finite gradient"):
        train.run(loop_config, str(tmp_path / "run"))


def test_loss_spikes_are_reported_against_the_running_mean():
    reports = []
    monitor = train.NumericsMonitor(max_skips=0, spike_factor=2.0, skipped_before=0, report=reports.append)
    logged = {}
    for step, loss in enumerate([4.0, 3.0, 2.5, 2.4, 9.0, 2.3], start=1):
        scalars = {"train/loss": loss, "train/grad_norm": 1.0}
        monitor.check(step, scalars)
        logged[step] = scalars.get("train/loss_spike")
    # Running mean before step 5: 4, 3.9, 3.76, 3.624 -> 9.0 is 2.48x of it.
    assert logged == {1: None, 2: None, 3: None, 4: None, 5: pytest.approx(9.0 / 3.624), 6: None}
    assert reports == ["step 5: loss spike, 9 is 2.5x the running mean 3.624"]
    with pytest.raises(FloatingPointError, match="at step 7"):
        monitor.check(7, {"train/loss": float("nan"), "train/grad_norm": 1.0})
