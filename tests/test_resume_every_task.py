"""Exact resume for every task of the one loop: a run that crashes right after a checkpoint and is
run again reproduces the uninterrupted run's losses and final parameters bit for bit (MLM masks,
dropout, DPO's cached reference and the skip-gram included). LM: tests/test_train_loop.py; online DPO:
tests/test_online_dpo_resume.py."""
import os

import jax
import numpy as np
import pytest

from llm_jax import checkpoint, metrics, train

pytestmark = pytest.mark.slow


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
    from conftest import make_tiny_config
    workdir = str(tmp_path_factory.mktemp("sft") / "run")
    train.run(make_tiny_config(**TASK_FIELDS["sft"]), workdir)
    return workdir


POST = {"data.seq_len": 48, "data.num_examples": 64, "data.num_eval_examples": 16}
TASK_FIELDS = {
    "mlm": {"task": "mlm", "model.kind": "encoder", "model.style": "bert", "model.dropout": 0.1},
    "sft": {"task": "sft", **POST, "model.dropout": 0.1},
    "reward": {"task": "reward", **POST},
    "dpo": {"task": "dpo", **POST},
    "skipgram": {"task": "skipgram", "model.kind": "word2vec", "word2vec.window": 3},
}


def losses(workdir):
    rows = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def final_params(workdir, config):
    exp = train.build_experiment(config)
    abstract = train.state_shardings_and_init(exp, config.seed)[0]
    manager = checkpoint.make_manager(workdir, keep=config.train.keep_checkpoints)
    state = checkpoint.restore(manager, manager.latest_step(), abstract, None)
    manager.close()
    return jax.device_get(state.params)


@pytest.mark.parametrize("task", sorted(TASK_FIELDS))
def test_crash_and_rerun_reproduce_the_uninterrupted_run(task, tiny_config, text_corpus, sft_workdir, tmp_path,
                                                         monkeypatch):
    fields = {"data.dataset": "files", "data.files": text_corpus, "data.tfds_data_dir": str(tmp_path / "tfds"),
              "data.validation_fraction": 0.2, "data.prefetch": 2, "train.num_steps": 4, "train.eval_every": 2,
              "train.checkpoint_every": 2, **TASK_FIELDS[task]}
    if task in ("reward", "dpo"):
        fields["train.init_from"] = sft_workdir
    config = tiny_config(**fields)
    uninterrupted, interrupted = str(tmp_path / "uninterrupted"), str(tmp_path / "interrupted")
    train.run(config, uninterrupted)

    real_save = checkpoint.save

    def save_then_crash(manager, step, state, data_iterator, **kwargs):
        real_save(manager, step, state, data_iterator, **kwargs)
        if step == 2:
            raise Crash("after checkpoint 2")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save", save_then_crash)
        with pytest.raises(Crash):
            train.run(config, interrupted)
    train.run(config, interrupted)

    assert losses(interrupted) == losses(uninterrupted) and len(losses(uninterrupted)) == 4
    jax.tree.map(np.testing.assert_array_equal, final_params(uninterrupted, config), final_params(interrupted, config))
