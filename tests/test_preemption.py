"""Preemption: SIGTERM / SIGINT stop the loop after the running step, with a checkpoint of that
step, and the rerun resumes exactly as if nothing had happened."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from llm_jax import metrics, preemption, sharding, train

pytestmark = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                reason="signal handlers need the main thread")


@pytest.fixture
def loop_config(tiny_config, text_corpus, tmp_path):
    # checkpoint_every=4 > the preempted step: the stop must save a step off the checkpoint schedule.
    return tiny_config(**{"data.dataset": "files", "data.files": text_corpus, "data.tfds_data_dir": str(tmp_path / "tfds"),
                          "data.validation_fraction": 0.2, "train.checkpoint_every": 4, "train.eval_every": 4,
                          "data.prefetch": 2})


def test_stop_signals_set_a_flag_and_restore_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.StopSignals() as signals:
        assert signals.agreed(process_count=1) is None
        signal.raise_signal(signal.SIGTERM)  # would kill the test process without the handler
        assert signals.agreed(process_count=1) == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def losses(workdir):
    rows = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_running_step_and_the_rerun_matches(loop_config, tmp_path, monkeypatch, signum):
    uninterrupted = str(tmp_path / "uninterrupted")
    train.run(loop_config, uninterrupted)

    preempted = str(tmp_path / "preempted")
    real_shard = sharding.shard_host_batch
    calls = []

    def shard_and_signal(batch, batch_sharding):
        calls.append(1)
        # The eval batches are placed first, once; then one call per training step.
        if len(calls) == loop_config.train.eval_batches + 3:  # while step 3 is being prepared
            signal.raise_signal(signum)
        return real_shard(batch, batch_sharding)

    with monkeypatch.context() as patch:
        patch.setattr(sharding, "shard_host_batch", shard_and_signal)
        with pytest.raises(preemption.Preempted) as stopped:
            train.run(loop_config, preempted)
    assert stopped.value.step == 3 and stopped.value.signal_name == signal.Signals(signum).name
    assert sorted(os.listdir(os.path.join(preempted, "checkpoints"))) == ["3"]
    assert [s for s, _ in losses(preempted)] == [1, 2, 3]  # flushed, nothing lost

    train.run(loop_config, preempted)  # resumes from step 3
    assert losses(preempted) == losses(uninterrupted)  # bit-for-bit, each step once


@pytest.mark.slow
def test_main_exits_with_the_preempted_status(loop_config, tmp_path):
    """The command line: SIGTERM mid-run -> exit status 75 and a checkpoint; the same command
    again -> runs to the end."""
    loop_config.train.num_steps = 400
    config_file = tmp_path / "job.py"
    config_file.write_text("import json\nimport ml_collections\n\n\ndef get_config():\n"
                           f"    return ml_collections.ConfigDict(json.loads({loop_config.to_json()!r}))\n")
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "llm_jax.main", f"--config={config_file}", f"--workdir={workdir}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics_file = workdir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics_file.exists() and any('"train/loss"' in line for line in metrics_file.read_text().splitlines()[1:]):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == preemption.EXIT_CODE, stderr[-2000:]
    assert "preempted: stopped by SIGTERM after step" in stderr
    saved = os.listdir(workdir / "checkpoints")
    assert len(saved) == 1 and 0 < int(saved[0]) < 400
    steps = [s for s, _ in losses(str(workdir))]
    assert steps == list(range(1, int(saved[0]) + 1))
