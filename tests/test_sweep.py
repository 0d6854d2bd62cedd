"""Sweeps: expansion and names, validation, the run loop (skip, resume, failures, preemption) with a
fake child, the scheduler outputs, the CSV; and one real sweep of two nano runs."""
import csv
import json
import os
import shlex
import signal
import subprocess
import sys

import pytest
from conftest import single_device_env

from llm_jax import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = "experiments/example_sweep.py"
STEPS = 5


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # config paths in sweep files are relative to the working directory


def write_sweep(tmp_path, body, name="study"):
    path = tmp_path / f"{name}.py"
    path.write_text("from llm_jax import sweep\n\n\ndef get_sweep(arg=''):\n" + "".join(
        f"    {line}\n" for line in body.strip().splitlines()))
    return str(path)


GRID = f"""return dict(config="configs/quickstart.py:size=nano,steps={STEPS}",
            fixed={{"data.seq_len": 32}},
            runs=sweep.product({{"model.size": ["nano", "micro"]}}, {{"optimizer.learning_rate": [1e-3, 3e-3]}}))"""


class FakeChild:
    """Stands in for `python -m llm_jax.main`: writes metrics as a run would and exits with the
    status given for its run (0 by default: trains to train.num_steps)."""

    def __init__(self, statuses=None, on_call=None):
        self.statuses, self.on_call, self.calls = statuses or {}, on_call, []

    def __call__(self, command, log_path, echo):
        workdir = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--workdir="))
        name = os.path.basename(workdir)
        self.calls.append(name)
        status = self.statuses.get(name, 0)
        write_metrics(workdir, STEPS if status == 0 else 2)
        if self.on_call:
            self.on_call(name)
        return status, "" if status == 0 else "error: model.size must be one of ..."


def write_metrics(workdir, last_step, eval_losses=(3.0, 2.5)):
    os.makedirs(workdir, exist_ok=True)
    records = [{"step": 0, "eval/unigram_baseline": 3.2}]
    records += [{"step": s, "train/loss": 4.0 - 0.1 * s, "train/tokens_seen": s * 256} for s in range(1, last_step + 1)]
    records += [{"step": last_step, "eval/loss": loss} for loss in eval_losses]
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------- expansion

def test_product_zip_and_chain_build_override_lists():
    grid = sweep.product({"model.size": ["nano", "micro"], "model.style": "llama"}, {"optimizer.learning_rate": [1, 2]})
    assert grid == [{"model.size": s, "model.style": "llama", "optimizer.learning_rate": lr}
                    for s in ("nano", "micro") for lr in (1, 2)]
    assert sweep.zip_({"model.size": ["nano", "micro"], "train.num_steps": [10, 20]}) == [
        {"model.size": "nano", "train.num_steps": 10}, {"model.size": "micro", "train.num_steps": 20}]
    with pytest.raises(ValueError, match="one length"):
        sweep.zip_({"model.size": ["nano"], "train.num_steps": [10, 20]})
    assert sweep.chain([{"seed": 1}], sweep.product([{"seed": 2}], {"task": ["lm"]})) == [
        {"seed": 1}, {"seed": 2, "task": "lm"}]
    assert sweep.parse_arg("scale=tpu,steps=30", scale="cpu", steps=10, lr=1e-3) == dict(scale="tpu", steps=30, lr=1e-3)
    with pytest.raises(ValueError, match="unknown sweep argument 'sclae'"):
        sweep.parse_arg("sclae=tpu", scale="cpu")


def test_runs_get_stable_readable_unique_names_and_workdirs(tmp_path):
    path = write_sweep(tmp_path, GRID)
    _, runs = sweep.load(path, str(tmp_path / "root"))
    names = [r.name for r in runs]
    assert names == ["size=nano,learning_rate=0.001", "size=nano,learning_rate=0.003",
                     "size=micro,learning_rate=0.001", "size=micro,learning_rate=0.003"]
    assert names == [r.name for r in sweep.load(path, str(tmp_path / "root"))[1]]  # deterministic
    assert runs[2].workdir == str(tmp_path / "root" / "study" / names[2])
    assert runs[2].resolved.model.size == "micro" and runs[2].resolved.data.seq_len == 32
    assert runs[2].resolved.train.num_steps == STEPS  # from the config's argument
    # Leaves shared by two keys keep the full key; values are sanitised; a run may name itself or
    # bring its own config argument.
    path = write_sweep(tmp_path, """return dict(name="s2", config="configs/quickstart.py", runs=[
        {"dpo.pairs": "all", "online_dpo.pairs": "all", "data.files": "/data/*.txt"},
        {"name": "mine", "seed": 3},
        {"config": "configs/quickstart.py:steps=7"}])""", name="other")
    runs = sweep.load(path, "r")[1]
    assert [r.name for r in runs] == ["dpo.pairs=all,online_dpo.pairs=all,files=_data__.txt", "mine", "config=steps=7"]
    assert runs[2].resolved.train.num_steps == 7 and runs[0].workdir == os.path.join("r", "s2", runs[0].name)
    long = sweep.run_name([("files", "x" * 300)])
    assert len(long) <= 120 and long == sweep.run_name([("files", "x" * 300)]) != sweep.run_name([("files", "y" * 300)])


def test_the_argument_picks_presets_of_the_example_sweep():
    smoke, runs = sweep.load(EXAMPLE + ":scale=smoke")
    assert smoke.name == "example_sweep_smoke" and len(runs) == 2
    assert {r.resolved.train.num_steps for r in runs} == {3}
    cpu, cpu_runs = sweep.load(EXAMPLE)
    tpu, tpu_runs = sweep.load(EXAMPLE + ":scale=tpu")
    assert cpu.name == "example_sweep_cpu" and [r.resolved.model.size for r in cpu_runs] == ["nano"] * 2 + ["micro"] * 2
    assert tpu.name == "example_sweep_tpu" and {r.resolved.model.dtype for r in tpu_runs} == {"bfloat16"}
    assert [r.name for r in tpu_runs][0] == "size=small,learning_rate=0.0003,seed=0"


@pytest.mark.parametrize("body, message", [
    ("return dict(config='configs/quickstart.py', runs=[{'model.sizee': 'nano'}])",
     "run 0 sets model.sizee='nano': the config has no such field"),
    ("return dict(config='configs/quickstart.py', runs=[{'seed': 1}, {'model.size': 3}])",
     "run 1 sets model.size=3: Could not override field 'size'"),
    ("return dict(config='configs/quickstart.py', runs=[{'seed': 1}], fixed={'nope.x': 1})",
     "`fixed` (or --set) sets nope.x=1: the config has no such field"),
    ("return dict(config='configs/quickstart.py', runs=[{'seed': 1}, {'name': 'seed=1'}])",
     "runs 0 and 1 have the same name 'seed=1'"),
    ("return dict(config='configs/quickstart.py', runs=[])", "`runs` must be a non-empty list of dicts"),
    ("return dict(config='configs/nope.py', runs=[{'seed': 1}])", "config configs/nope.py not found"),
    ("return dict(config='configs/quickstart.py:size=huge', runs=[{'seed': 1}])",
     "config configs/quickstart.py:size=huge failed (ValueError: size must be one of"),
    ("return dict(config='configs/quickstart.py', run=[{'seed': 1}])", "get_sweep('') failed (TypeError"),
])
def test_bad_sweep_files_fail_before_anything_runs_naming_file_and_key(tmp_path, body, message, capsys):
    path = write_sweep(tmp_path, body)
    with pytest.raises(sweep.SweepError) as error:
        sweep.load(path, str(tmp_path))
    assert str(error.value).startswith(f"sweep file {path}") and message in str(error.value)
    assert sweep.main(["run", path, f"--root={tmp_path}"]) == 1  # the command line: one line, status 1
    assert capsys.readouterr().err == f"error: {error.value}\n"
    assert not (tmp_path / "study").exists()


def test_sweep_files_without_get_sweep_or_with_errors_are_named(tmp_path):
    (tmp_path / "empty.py").write_text("SWEEP = []\n")
    (tmp_path / "broken.py").write_text("def get_sweep(arg:\n")
    with pytest.raises(sweep.SweepError, match=r"sweep file .*empty.py defines no get_sweep\(arg\)"):
        sweep.load(str(tmp_path / "empty.py"))
    with pytest.raises(sweep.SweepError, match=r"sweep file .*broken.py does not load \(SyntaxError"):
        sweep.load(str(tmp_path / "broken.py"))
    with pytest.raises(sweep.SweepError, match="sweep file missing.py not found"):
        sweep.load("missing.py")
    with pytest.raises(sweep.SweepError, match=r"sweep file .*: get_sweep\('scale=xx'\) failed .*scale must be one"):
        sweep.load(EXAMPLE + ":scale=xx")
    with pytest.raises(sweep.SweepError, match="sets model.nope=1: the config has no such field"):
        sweep.load(EXAMPLE, sets=["model.nope=1"])


# ------------------------------------------------------------------------------- running

def test_finished_runs_are_skipped_and_interrupted_ones_rerun(tmp_path):
    s, runs = sweep.load(write_sweep(tmp_path, GRID), str(tmp_path))
    write_metrics(runs[0].workdir, STEPS)  # finished (by hand, or by `commands`)
    write_metrics(runs[1].workdir, 2)  # interrupted: main resumes it when run again
    child = FakeChild()
    assert sweep.run_sweep(s, runs, str(tmp_path), runner=child, echo=False) == 0
    assert child.calls == [r.name for r in runs[1:]]
    child = FakeChild()
    assert sweep.run_sweep(s, runs, str(tmp_path), runner=child, echo=False) == 0
    assert child.calls == []  # everything finished
    # A longer run of the same sweep (train.num_steps is restart-safe) continues every run.
    s, longer = sweep.load(write_sweep(tmp_path, GRID.replace(f"steps={STEPS}", f"steps={STEPS + 5}")), str(tmp_path))
    assert not any(sweep.is_finished(r) for r in longer)


def test_a_failed_run_is_recorded_and_the_others_run(tmp_path, capsys):
    s, runs = sweep.load(write_sweep(tmp_path, GRID), str(tmp_path))
    child = FakeChild({runs[1].name: 1, runs[2].name: -9})
    assert sweep.run_sweep(s, runs, str(tmp_path), runner=child, echo=False) == 1
    assert child.calls == [r.name for r in runs]
    status = json.loads((tmp_path / "study" / "sweep_status.json").read_text())
    assert status["failures"] == [runs[1].name, runs[2].name]
    assert status["runs"][runs[1].name] == {"status": "failed", "exit_status": 1, "attempts": 1,
                                            "error": "error: model.size must be one of ...",
                                            "wall_time_s": status["runs"][runs[1].name]["wall_time_s"]}
    assert status["runs"][runs[3].name]["status"] == "finished"
    rows = read_csv(tmp_path / "study" / "results.csv")
    assert [(r["status"], r["exit_status"]) for r in rows] == [("finished", "0"), ("failed", "1"), ("failed", "-9"),
                                                                ("finished", "0")]
    assert "2 failed" in capsys.readouterr().out
    child = FakeChild()  # the next attempt retries only the failed runs
    assert sweep.run_sweep(s, runs, str(tmp_path), runner=child, echo=False) == 0
    assert child.calls == [runs[1].name, runs[2].name]
    assert json.loads((tmp_path / "study" / "sweep_status.json").read_text())["runs"][runs[1].name]["attempts"] == 2


def test_a_preempted_run_stops_the_sweep_with_status_75(tmp_path):
    s, runs = sweep.load(write_sweep(tmp_path, GRID), str(tmp_path))
    child = FakeChild({runs[1].name: 75})
    assert sweep.run_sweep(s, runs, str(tmp_path), runner=child, echo=False) == sweep.PREEMPTED
    assert child.calls == [runs[0].name, runs[1].name]
    status = json.loads((tmp_path / "study" / "sweep_status.json").read_text())
    assert [v["status"] for v in status["runs"].values()] == ["finished", "preempted", "pending", "pending"]
    assert status["failures"] == []
    child = FakeChild()  # the same command resumes: the preempted run and the rest
    assert sweep.run_sweep(s, runs, str(tmp_path), runner=child, echo=False) == 0
    assert child.calls == [r.name for r in runs[1:]]


def test_a_stop_signal_to_the_sweep_stops_it_after_the_current_run(tmp_path):
    s, runs = sweep.load(write_sweep(tmp_path, GRID), str(tmp_path))
    before = signal.getsignal(signal.SIGTERM)
    child = FakeChild(on_call=lambda name: os.kill(os.getpid(), signal.SIGTERM))
    assert sweep.run_sweep(s, runs, str(tmp_path), runner=child, echo=False) == sweep.PREEMPTED
    assert child.calls == [runs[0].name]
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_child_runner_logs_output_and_returns_status_and_error_line(tmp_path):
    script = "import sys; print('model: 1 parameter'); print('error: data.files matched nothing', file=sys.stderr); " \
             "print('exiting'); sys.exit(3)"
    log = tmp_path / "sweep.log"
    status = sweep.run_child([sys.executable, "-c", script], str(log), echo=False)
    assert status == (3, "error: data.files matched nothing")
    assert "model: 1 parameter" in log.read_text() and "exiting" in log.read_text()
    status, message = sweep.run_child([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"], str(log), False)
    assert (status, message) == (-9, "killed by SIGKILL")


# ------------------------------------------------------------------------------- schedulers and CSV

def test_commands_print_one_main_command_line_per_run(tmp_path, capsys):
    path = write_sweep(tmp_path, GRID)
    assert sweep.main(["commands", path, "--root=out", "--set=data.batch_size=4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    argv = shlex.split(lines[2])
    assert argv[:5] == ["python", "-m", "llm_jax.main", f"--config=configs/quickstart.py:size=nano,steps={STEPS}",
                        "--workdir=out/study/size=micro,learning_rate=0.001"]
    assert argv[5:] == ["--config.data.seq_len=32", "--config.data.batch_size=4", "--config.model.size=micro",
                        "--config.optimizer.learning_rate=0.001"]


def test_slurm_writes_a_job_array_script_that_picks_the_run_by_task_id(tmp_path, capsys):
    path, out = write_sweep(tmp_path, GRID), tmp_path / "job.sbatch"
    args = ["slurm", path, f"--root={tmp_path}/runs", f"--out={out}", "--partition=gpu", "--gpus_per_task=1",
            "--time=2:00:00", "--max_parallel=2", "--setup=source venv/bin/activate", "--set=data.batch_size=4"]
    assert sweep.main(args) == 0
    script = out.read_text()
    assert script.startswith("#!/bin/bash\n")
    for line in ["#SBATCH --array=0-3%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --time=2:00:00", "#SBATCH --job-name=study",
                 f"#SBATCH --output={tmp_path}/runs/study/slurm-%A_%a.out",
                 f"cd {REPO}", "source venv/bin/activate",
                 f'exec python -m llm_jax.sweep run-one {path} --root={tmp_path}/runs --set=data.batch_size=4 '
                 f'--index="$SLURM_ARRAY_TASK_ID"']:
        assert line in script.splitlines(), line
    assert "#SBATCH --mem" not in script and (tmp_path / "runs" / "study").is_dir()
    assert subprocess.run(["bash", "-n", str(out)]).returncode == 0
    assert "sbatch --array=0-3" in capsys.readouterr().out
    assert sweep.main(["run-one", path, "--index=4"]) == 1
    assert "--index must be in 0..3, got 4" in capsys.readouterr().err


def test_collect_writes_one_row_per_run_with_config_size_and_final_metrics(tmp_path, capsys):
    s, runs = sweep.load(write_sweep(tmp_path, GRID), str(tmp_path))
    write_metrics(runs[0].workdir, STEPS, eval_losses=(2.0, 2.5))
    sweep.run_one(runs[1], FakeChild({runs[1].name: 1}), echo=False)
    write_metrics(runs[2].workdir, 2)
    assert sweep.main(["collect", write_sweep(tmp_path, GRID), f"--root={tmp_path}", f"--out={tmp_path}/r.csv"]) == 0
    assert capsys.readouterr().out.endswith(f"\nwrote {tmp_path}/r.csv\n")
    rows = read_csv(tmp_path / "r.csv")
    assert list(rows[0])[:8] == ["run", "status", "exit_status", "error", "attempts", "wall_time_s", "model.size",
                                 "optimizer.learning_rate"]
    assert {"model.d_model", "model.n_layers", "data.seq_len", "data.batch_size", "train.num_steps", "params",
            "params_non_embedding", "tokens_seen", "flops", "train_loss", "eval_loss", "best_eval_loss", "config",
            "workdir"} <= set(rows[0])
    assert [r["status"] for r in rows] == ["finished", "failed", "incomplete", "pending"]
    first = rows[0]
    assert (first["model.size"], first["optimizer.learning_rate"], first["model.d_model"], first["model.n_layers"]) == (
        "nano", "0.001", "64", "2")
    assert (first["data.seq_len"], first["data.batch_size"], first["train.num_steps"]) == ("32", "16", str(STEPS))
    # nano: 2 blocks of 12 d^2 + 13 d (attention and MLP with biases, two LayerNorms) + a final
    # LayerNorm; embeddings: the byte vocabulary (259) padded to 320 rows, and 32 positions.
    d = 64
    non_embedding = 2 * (12 * d * d + 13 * d) + 2 * d
    assert int(first["params_non_embedding"]) == non_embedding == 100_096
    assert int(first["params"]) == non_embedding + 320 * d + 32 * d
    assert rows[2]["model.size"] == "micro" and int(rows[2]["params_non_embedding"]) > non_embedding
    assert (float(first["train_loss"]), int(first["tokens_seen"]), int(first["final_step"])) == (
        pytest.approx(4.0 - 0.1 * STEPS), STEPS * 256, STEPS)
    assert (float(first["eval_loss"]), float(first["best_eval_loss"])) == (2.5, 2.0)
    # C for the scaling fits: 6N per token plus the embedding-head and attention terms.
    assert float(first["flops"]) > 6 * non_embedding * STEPS * 256 and rows[3]["flops"] == ""
    assert rows[1]["error"] == "error: model.size must be one of ..." and rows[1]["exit_status"] == "1"
    assert rows[3]["train_loss"] == "" and rows[3]["params"] != ""


# ------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_a_real_sweep_of_two_nano_runs(text_corpus, tmp_path):
    """`python -m llm_jax.sweep run` of the example's smoke scale: 2 runs of `llm_jax.main`, 3 steps each
    (two seeds: the second run reuses the first's compiled steps from the test session's cache)."""
    root = tmp_path / "runs"
    command = [sys.executable, "-m", "llm_jax.sweep", "run", EXAMPLE + ":scale=smoke", f"--root={root}", "--quiet",
               "--set=data.dataset=files", f"--set=data.files={text_corpus}",
               f"--set=data.tfds_data_dir={tmp_path}/tfds",
               "--set=data.validation_fraction=0.2", "--set=train.peak_flops_per_device=1e12"]
    # One device (not conftest's 8) compiles faster; the runs inherit the environment.
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=single_device_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_csv(root / "example_sweep_smoke" / "results.csv")
    assert [(r["run"], r["status"], r["final_step"]) for r in rows] == [
        ("size=nano,learning_rate=0.001,seed=0", "finished", "3"),
        ("size=nano,learning_rate=0.001,seed=1", "finished", "3")]
    for row in rows:
        assert float(row["eval_loss"]) > 0 and float(row["train_loss"]) > 0 and int(row["tokens_seen"]) == 3 * 8 * 32
        assert os.path.exists(os.path.join(row["workdir"], "checkpoints", "3"))
        with open(os.path.join(row["workdir"], "sweep.log")) as log:  # main's own count
            assert f"model: {int(row['params']):,} parameters ({int(row['params_non_embedding']):,}" in log.read()
    sets = [arg.removeprefix("--set=") for arg in command if arg.startswith("--set=")]
    s, runs = sweep.load(EXAMPLE + ":scale=smoke", str(root), sets)  # the same sweep again: nothing to run
    child = FakeChild()
    assert sweep.run_sweep(s, runs, str(root), runner=child, echo=False) == 0 and child.calls == []


def test_steps_for_flops_sizes_a_run_to_its_budget_and_names_a_budget_below_one_step():
    from llm_jax import metrics, train
    from llm_jax.data import tokenizer as tokenizer_lib
    fields = {"model.size": "nano", "data.seq_len": 32, "data.batch_size": 4}
    config = sweep.resolve("configs/quickstart.py", fields)
    per_step = metrics.flops_per_token(train.model_config(config, tokenizer_lib.get_tokenizer("byte", "").vocab_size), 32) * 4 * 32
    assert sweep.steps_for_flops("configs/quickstart.py", fields, 10.4 * per_step) == 10
    with pytest.raises(sweep.SweepError, match="less than one step"):
        sweep.steps_for_flops("configs/quickstart.py", fields, 0.5 * per_step)
    with pytest.raises(sweep.SweepError, match="model.nope"):
        sweep.resolve("configs/quickstart.py", {"model.nope": 1})
