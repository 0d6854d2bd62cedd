"""Two processes on localhost, joined by jax.distributed, train one model together.

Each process owns 2 (fake CPU) devices of a 4-device mesh and reads its own shard of the data;
a stop signal to one of them stops both at the same saved step, and a restart of both resumes
from the shared checkpoint.
"""
import os
import socket
import subprocess
import signal
import sys
import time

import pytest

from llm_jax import metrics, preemption

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(workdir, corpus, tfds_dir, steps, *extra):
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = []
    for process_id in range(2):
        args = [sys.executable, "-m", "llm_jax.main", f"--config=configs/quickstart.py:size=nano,steps={steps}",
                f"--workdir={workdir}", "--config.data.dataset=files", f"--config.data.files={corpus}",
                f"--config.data.tfds_data_dir={tfds_dir}", "--config.data.validation_fraction=0.2",
                "--config.data.seq_len=32", "--config.data.batch_size=8", "--config.train.log_every=1",
                "--config.train.eval_batches=2", "--config.train.checkpoint_every=2", "--config.train.progress=False",
                "--config.mesh.data=2", "--config.mesh.fsdp=2",
                "--config.distributed.initialize=True", f"--config.distributed.coordinator_address=localhost:{port}",
                "--config.distributed.num_processes=2", f"--config.distributed.process_id={process_id}", *extra]
        procs.append(subprocess.Popen(args, env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs, expected_status=0):
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == expected_status, out[-3000:]
    return outputs


def launch(workdir, corpus, tfds_dir, steps, *extra):
    return finish(start(workdir, corpus, tfds_dir, steps, *extra))


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(text_corpus, tmp_path):
    """Two processes train together; the scheduler signals process 1 only: they agree (one
    all-gather per log step), both save the same step off the checkpoint schedule and exit 75;
    a relaunch of both resumes there, each from its own data position, and finishes."""
    workdir, tfds_dir = str(tmp_path / "run"), str(tmp_path / "tfds")
    # An explicit warmup, so the relaunch may shorten the run (train.num_steps is restart-safe).
    procs = start(workdir, text_corpus, tfds_dir, 400, "--config.train.checkpoint_every=100",
                  "--config.optimizer.warmup_steps=2")
    metrics_file = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if os.path.exists(metrics_file) and any('"train/loss"' in line for line in open(metrics_file)):
            break
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outputs = finish(procs, expected_status=preemption.EXIT_CODE)
    saved = sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())
    assert len(saved) == 1 and 0 < saved[0] < 100, saved
    stopped = saved[0]
    assert f"stopped by a stop signal on another process after step {stopped}" in outputs[0]
    assert f"stopped by SIGTERM after step {stopped}" in outputs[1]
    rows = metrics.read_metrics(metrics_file)
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, stopped + 1))

    # Both processes' data-iterator positions are in the checkpoint.
    data_files = set(os.listdir(os.path.join(workdir, "checkpoints", str(stopped), "data")))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= data_files

    outputs = launch(workdir, text_corpus, tfds_dir, 400, "--config.train.checkpoint_every=100",
                     "--config.optimizer.warmup_steps=2", f"--config.train.num_steps={stopped + 2}")
    assert f"resuming at step {stopped}" in outputs[0]
    rows = metrics.read_metrics(metrics_file)  # written by process 0 only
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, stopped + 3))
    final = sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())
    assert final == [stopped, stopped + 2]
