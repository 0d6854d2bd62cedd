"""The loop end to end on a tiny local corpus: metrics, checkpoints, exact resume, eval."""
import json
import os

import jax
import numpy as np
import pytest

from llm_jax import checkpoint, metrics, train


@pytest.fixture
def loop_config(tiny_config, text_corpus, tmp_path):
    return tiny_config(**{"data.dataset": "files", "data.files": text_corpus,
                          "data.tfds_data_dir": str(tmp_path / "tfds"), "data.validation_fraction": 0.2})


def final_params(workdir, config):
    exp = train.build_experiment(config)
    abstract, _, _ = train.state_shardings_and_init(exp, config.seed)
    manager = checkpoint.make_manager(workdir, keep=config.train.keep_checkpoints)
    state = checkpoint.restore(manager, manager.latest_step(), abstract, None)
    manager.close()
    return jax.device_get(state.params)


def test_run_writes_metrics_checkpoints_and_config(loop_config, tmp_path):
    workdir = str(tmp_path / "run")
    last = train.run(loop_config, workdir)
    rows = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    train_rows = [r for r in rows if "train/loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 7))
    assert [r["step"] for r in eval_rows] == [3, 6]
    for key in ("train/learning_rate", "train/grad_norm", "train/tokens_per_sec", "train/mfu"):
        assert key in train_rows[-1], key
    assert eval_rows[-1]["eval/perplexity"] == pytest.approx(np.exp(eval_rows[-1]["eval/loss"]), rel=1e-6)
    assert last["eval/loss"] == eval_rows[-1]["eval/loss"]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["data"]["seq_len"] == 32


class Crash(Exception):
    pass


def crash_after_checkpoint(monkeypatch, at_step):
    real_save = checkpoint.save

    def save_then_crash(manager, step, state, data_iterator):
        real_save(manager, step, state, data_iterator)
        if step == at_step:
            raise Crash(f"simulated crash after saving step {step}")

    monkeypatch.setattr(checkpoint, "save", save_then_crash)


def test_interrupted_run_resumes_exactly(loop_config, tmp_path, monkeypatch):
    loop_config.data.prefetch = 2  # the iterator state must not count prefetched batches
    uninterrupted = str(tmp_path / "uninterrupted")
    train.run(loop_config, uninterrupted)

    interrupted = str(tmp_path / "interrupted")
    with monkeypatch.context() as patch:
        crash_after_checkpoint(patch, at_step=3)
        with pytest.raises(Crash):
            train.run(loop_config, interrupted)
    train.run(loop_config, interrupted)  # resumes by itself from step 3

    def losses(workdir):
        rows = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
        return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]

    assert losses(interrupted) == losses(uninterrupted)  # bit-for-bit, each step logged once
    a, b = final_params(uninterrupted, loop_config), final_params(interrupted, loop_config)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_workdir_of_another_config_is_refused(loop_config, tmp_path):
    workdir = str(tmp_path / "run")
    loop_config.train.num_steps = 3
    train.run(loop_config, workdir)
    loop_config.optimizer.learning_rate = 0.5
    with pytest.raises(ValueError, match=r"optimizer\.learning_rate"):
        train.run(loop_config, workdir)


def test_mlm_encoder_trains(loop_config, tmp_path):
    loop_config.task, loop_config.model.kind, loop_config.model.style = "mlm", "encoder", "bert"
    last = train.run(loop_config, str(tmp_path / "bert"))
    assert np.isfinite(last["eval/loss"]) and last["train/loss"] > 0
