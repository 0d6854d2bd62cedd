"""Online DPO under preemption: SIGTERM / SIGINT inside an iteration, during its sampling or at its
end save the running step with the iteration's work in flight (and the moved reference), and the
rerun reproduces the uninterrupted run's losses, rewards and parameters exactly."""
import os
import signal
import threading

import jax
import numpy as np
import pytest

from llm_jax import checkpoint, evaluation, metrics, online_dpo, preemption, train
from llm_jax.data import post_training

pytestmark = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                reason="signal handlers need the main thread")

COMMON = {"data.seq_len": 32, "data.tasks": "count", "data.num_examples": 64, "data.num_eval_examples": 16}
STEPS_PER_ITERATION = 3  # > 2, so "the 2nd step of an iteration" is inside it


@pytest.fixture(scope="module", autouse=True)
def varied_proxy_reward():
    """A deterministic proxy reward that tells almost any two answers apart, so every iteration
    builds pairs and trains: an untrained policy earns no gold credit, which would build none."""
    def score(self, prompts, responses):
        return np.asarray([sum(map(ord, response)) % 97 for response in responses], np.float32)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(online_dpo.Scorer, "__call__", score)
        yield


@pytest.fixture(scope="module")
def init_workdir(tmp_path_factory):
    """The model online DPO starts from (and its first reference): a freshly initialised nano
    model saved as a checkpoint; resuming exactly needs no trained one."""
    from conftest import make_tiny_config
    exp = train.build_experiment(make_tiny_config(**COMMON))
    _, _, init_state = train.state_shardings_and_init(exp, seed=1)
    workdir = str(tmp_path_factory.mktemp("init") / "run")
    manager = checkpoint.make_manager(workdir, keep=1)
    checkpoint.save(manager, 0, init_state(), None)
    manager.close()
    return workdir


def online_config(init_workdir, **overrides):
    from conftest import make_tiny_config
    # checkpoint_every = the whole run: the stops below must save steps off the schedule.
    return make_tiny_config(**{"task": "online_dpo", "train.init_from": init_workdir,
                               "train.num_steps": 3 * STEPS_PER_ITERATION,
                               "train.checkpoint_every": 3 * STEPS_PER_ITERATION, "optimizer.learning_rate": 3e-3,
                               "optimizer.warmup_steps": 0, "online_dpo.steps_per_iteration": STEPS_PER_ITERATION,
                               "online_dpo.prompts_per_iteration": 4, "online_dpo.samples_per_prompt": 4,
                               "online_dpo.max_new_tokens": 4, "online_dpo.scorer": "gold", **COMMON, **overrides})


@pytest.fixture(scope="module")
def uninterrupted(init_workdir, tmp_path_factory):
    """(config, workdir) of a run without reference updates, never stopped."""
    config = online_config(init_workdir)
    workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    online_dpo.run(config, workdir)
    return config, workdir


def comparable_metrics(workdir):
    """The metrics.jsonl records without the wall-clock ones, which no two runs share."""
    timed = ("seconds", "per_sec", "step_time")
    rows = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return [{k: v for k, v in row.items() if not any(t in k for t in timed)} for row in rows]


def signal_at_step(patch, signum, iteration, step):
    """Raises `signum` while the batch of the `step`-th DPO step of `iteration` (both from 1) is
    prepared: that step still runs, and the loop sees the signal after it."""
    real = post_training.preference_batches
    calls = []

    def raising(batches):
        for n, batch in enumerate(batches, 1):
            if n == step:
                signal.raise_signal(signum)
            yield batch

    def batches_and_signal(*args, **kwargs):  # called once per iteration, for its pairs
        calls.append(1)
        batches, stats = real(*args, **kwargs)
        return (raising(batches) if len(calls) == iteration else batches), stats

    patch.setattr(post_training, "preference_batches", batches_and_signal)


def count_sampling(patch, *, signal_on_call=None, signum=signal.SIGTERM):
    """Counts the iterations that sample; optionally raises `signum` once that call's sampling is done."""
    real = evaluation.sample_responses
    calls = []

    def sample_and_count(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        if len(calls) == signal_on_call:
            signal.raise_signal(signum)
        return out

    patch.setattr(evaluation, "sample_responses", sample_and_count)
    return calls


def saved_steps(workdir):
    return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())


def test_sigterm_inside_an_iteration_resumes_it_without_sampling_again(uninterrupted, tmp_path, monkeypatch):
    config, expected = uninterrupted
    workdir = str(tmp_path / "preempted")
    with monkeypatch.context() as patch:
        signal_at_step(patch, signal.SIGTERM, iteration=2, step=2)
        with pytest.raises(preemption.Preempted) as stopped:
            online_dpo.run(config, workdir)
    step = STEPS_PER_ITERATION + 2
    assert stopped.value.step == step and stopped.value.signal_name == "SIGTERM"
    assert saved_steps(workdir) == [step]
    saved = os.listdir(os.path.join(workdir, "checkpoints", str(step)))
    assert "online" in saved and "reference" not in saved  # no reference updates: the SFT model's
    assert [r["step"] for r in comparable_metrics(workdir)] == [STEPS_PER_ITERATION]  # iteration 2: not yet

    with monkeypatch.context() as patch:
        sampled = count_sampling(patch)
        online_dpo.run(config, workdir)
    assert len(sampled) == 1  # iteration 3 only: iteration 2 finished on its saved pairs
    assert comparable_metrics(workdir) == comparable_metrics(expected)  # exactly, each iteration once


def test_sigint_after_sampling_keeps_the_sampled_pairs(uninterrupted, tmp_path, monkeypatch):
    config, expected = uninterrupted
    workdir = str(tmp_path / "preempted")
    with monkeypatch.context() as patch:
        count_sampling(patch, signal_on_call=2, signum=signal.SIGINT)
        with pytest.raises(preemption.Preempted) as stopped:
            online_dpo.run(config, workdir)
    # Stopped before iteration 2's first step; step 3 had no checkpoint, so it is saved with the pairs.
    assert stopped.value.step == STEPS_PER_ITERATION and stopped.value.signal_name == "SIGINT"
    assert saved_steps(workdir) == [STEPS_PER_ITERATION]

    with monkeypatch.context() as patch:
        sampled = count_sampling(patch)
        online_dpo.run(config, workdir)
    assert len(sampled) == 1
    assert comparable_metrics(workdir) == comparable_metrics(expected)


def test_updated_reference_survives_a_restart(init_workdir, tmp_path, monkeypatch):
    """With the reference moved to the policy after every iteration, a stop at the end of
    iteration 2 keeps that reference: iteration 3's KL, reference log-probs and losses (hence the
    final parameters) match the uninterrupted run's; the SFT reference would change them all."""
    config = online_config(init_workdir, **{"online_dpo.reference_update_every": 1})
    expected, workdir = str(tmp_path / "uninterrupted"), str(tmp_path / "preempted")
    online_dpo.run(config, expected)
    with monkeypatch.context() as patch:
        # The signal comes during the iteration's last step: the iteration ends (log, new
        # reference), then the run stops at its end.
        signal_at_step(patch, signal.SIGTERM, iteration=2, step=STEPS_PER_ITERATION)
        with pytest.raises(preemption.Preempted) as stopped:
            online_dpo.run(config, workdir)
    assert stopped.value.step == 2 * STEPS_PER_ITERATION
    assert saved_steps(workdir) == [2 * STEPS_PER_ITERATION]
    assert "reference" in os.listdir(os.path.join(workdir, "checkpoints", str(2 * STEPS_PER_ITERATION)))

    online_dpo.run(config, workdir)
    assert comparable_metrics(workdir) == comparable_metrics(expected)
    params = {name: train.load_run(path)[1] for name, path in (("resumed", workdir), ("expected", expected))}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params["resumed"]), jax.device_get(params["expected"]))


def test_checkpoints_without_the_online_items_still_restore(init_workdir, tmp_path):
    """A checkpoint of the state alone (written before the "online" and "reference" items existed)
    resumes at its iteration end with the SFT reference; inside an iteration it is a named error,
    since its pairs are lost. Orbax itself raises for a requested item a step folder lacks."""
    config = online_config(init_workdir, **{"online_dpo.reference_update_every": 1})
    exp = train.build_experiment(config)
    abstract_state, _, init_state = train.state_shardings_and_init(exp, config.seed)
    state = init_state()
    workdir = str(tmp_path / "old")
    old_manager = checkpoint.make_manager(workdir, keep=2)  # the state item only
    checkpoint.save(old_manager, STEPS_PER_ITERATION, state.replace(step=state.step + STEPS_PER_ITERATION), None)
    old_manager.close()

    manager = checkpoint.make_manager(workdir, keep=2, items=online_dpo.CHECKPOINT_ITEMS)
    restored, reference, work, step = online_dpo.restore_or_init(config, exp, manager, abstract_state, init_state)
    assert step == STEPS_PER_ITERATION and work is None and int(restored.step) == STEPS_PER_ITERATION
    sft = checkpoint.restore_params(init_workdir, abstract_state.params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(reference), jax.device_get(sft))

    checkpoint.save(manager, STEPS_PER_ITERATION + 1, state.replace(step=state.step + STEPS_PER_ITERATION + 1), None)
    with pytest.raises(ValueError, match="inside an iteration"):
        online_dpo.restore_or_init(config, exp, manager, abstract_state, init_state)
    manager.close()
