"""Fault injection: runs are killed, interrupted and their checkpoints damaged, over many restarts,
and each is compared with an uninterrupted run of the same config.

    python benchmarks/fault_injection.py                                  # the long form
    python benchmarks/fault_injection.py --random_kills=2 --num_steps=24  # the short form CI runs

Every run is `python -m llm_jax.main` in a child process on a tiny decoder (or
`benchmarks/fault_child.py` when a fault must strike inside the process: mid-save, mid-eval). After
each fault the same command is run again until it exits 0, and the finished workdir is compared
with the reference run's: final parameters bit for bit, and metrics.jsonl, where every step must
appear exactly once with the reference's loss.

Scenarios:
  random SIGKILL      kill -9 at a random moment after a random step (within two checkpoint
                      intervals of the resumed one), `--random_kills` times
  SIGKILL mid-save    kill -9 while Orbax writes a checkpoint (inside the data item's save)
  SIGKILL pre-manifest kill -9 after Orbax finished a checkpoint, before its manifest
  damaged checkpoint  flip a byte / truncate / delete a file of the newest checkpoint
  SIGTERM mid-eval    the preemption path: exit 75 with a checkpoint of the step, rerun
  SIGTERM mid-save    the signal arrives while a checkpoint is written
  full disk mid-save  a save fails with ENOSPC: exit 1 naming the intact checkpoint, rerun
  bad input           bad flags, values, corpora, JSONL, init_from, vocabulary: one error line,
                      exit 1, the run's files untouched; then the right command resumes

Columns: faults injected; runs recovered (reruns that reached the end); checkpointed steps lost
(the newest complete checkpoint at the fault minus the step the rerun resumed from: must be 0,
except a deliberately damaged checkpoint, whose own steps are expected back); steps redone
(trained after the last checkpoint, so trained again: the price of a kill); mismatches against
the reference (parameter leaves, metric steps missing, duplicated or different: must be 0).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_util, when loaded by path
from bench_util import machine_info, write_json_record  # noqa: E402

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

PREEMPTED = 75  # llm_jax.preemption.EXIT_CODE, without importing JAX in the parent's hot path
TIME_KEYS = ("train/tokens_per_sec", "train/step_time", "train/mfu")
COLUMNS = ("faults injected", "runs recovered", "checkpointed steps lost", "steps redone", "mismatches")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--random_kills", type=int, default=20, help="SIGKILLs at random moments")
    p.add_argument("--num_steps", type=int, default=60, help="steps of every run")
    p.add_argument("--checkpoint_every", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    p.add_argument("--scenarios", default="all", help="comma-separated scenario names, or 'all'")
    p.add_argument("--damages", default="flip,truncate,delete", help="what the damaged-checkpoint scenario does")
    p.add_argument("--workroot", default="", help="where the runs go (default: a temporary folder, removed)")
    p.add_argument("--timeout", type=float, default=300, help="seconds one child run may take")
    p.add_argument("--json", default="", help="append the results as one JSON line to this file")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# The run under test
# ----------------------------------------------------------------------------------------------

def write_config(root: str, num_steps: int, checkpoint_every: int) -> str:
    """A tiny decoder on a corpus of this repository's own sources, as a config file for main."""
    from llm_jax import config_lib

    corpus = os.path.join(root, "corpus")
    os.makedirs(corpus, exist_ok=True)
    sources = sorted(name for name in os.listdir(os.path.join(_REPO_ROOT, "llm_jax")) if name.endswith(".py"))
    for i, name in enumerate(sources):
        shutil.copy(os.path.join(_REPO_ROOT, "llm_jax", name), os.path.join(corpus, f"{i:02d}_{name}.txt"))
    config = config_lib.set_fields(config_lib.base_config(), {
        "model.size": "nano", "data.seq_len": 32, "data.batch_size": 8, "data.prefetch": 2,
        "data.dataset": "files", "data.files": os.path.join(corpus, "*.txt"), "data.validation_fraction": 0.2,
        "data.tfds_data_dir": os.path.join(root, "tfds"), "optimizer.warmup_steps": 2,
        "optimizer.learning_rate": 1e-2, "train.num_steps": num_steps, "train.log_every": 1,
        "train.eval_every": 6, "train.eval_batches": 2, "train.checkpoint_every": checkpoint_every,
        "train.keep_checkpoints": 3, "train.progress": False})
    path = os.path.join(root, "job.py")
    with open(path, "w") as f:
        f.write("import json\nimport ml_collections\n\n\ndef get_config():\n"
                f"    return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n")
    return path


def child_env() -> dict:
    """One CPU device, as a user's run would have (no fake devices from a test session), and
    unbuffered output, so a killed run's last lines ("resuming at step N") are not lost."""
    return {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONUNBUFFERED": "1"}


def main_command(config_file: str, workdir: str) -> list[str]:
    return [sys.executable, "-m", "llm_jax.main", f"--config={config_file}", f"--workdir={workdir}"]


def hooked_command(config_file: str, workdir: str, hook: str) -> list[str]:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_child.py")
    return [sys.executable, script, f"--hook={hook}", f"--config_file={config_file}", f"--workdir={workdir}"]


def run_to_end(config_file: str, workdir: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(main_command(config_file, workdir), capture_output=True, text=True, timeout=timeout,
                          env=child_env(), cwd=_REPO_ROOT)


def resumed_step(stdout: str) -> int:
    found = re.search(r"resuming at step (\d+)", stdout)
    return int(found.group(1)) if found else 0


def complete_checkpoints(workdir: str) -> list[int]:
    """Step folders Orbax finished (renamed from their temporary name): the checkpoints a resume
    is entitled to, with or without a manifest (a kill may fall between the two)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def logged_steps(workdir: str) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    steps = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by the kill
                continue
            if "train/loss" in record:
                steps.append(record["step"])
    return steps


class Tally:
    """One scenario's row."""

    def __init__(self, name: str):
        self.name = name
        self.faults = self.recovered = self.lost = self.redone = self.mismatches = 0
        self.notes: list[str] = []

    def row(self) -> dict:
        return {"scenario": self.name, "faults injected": self.faults, "runs recovered": self.recovered,
                "checkpointed steps lost": self.lost, "steps redone": self.redone, "mismatches": self.mismatches,
                "notes": "; ".join(self.notes)}


def check_resume(tally: Tally, output: str, expected: int, last_logged: int) -> None:
    """Books the run after a fault: it must resume from `expected`, the newest complete checkpoint
    at the fault (or the one before a deliberately damaged one)."""
    resumed = resumed_step(output)
    tally.lost += max(0, expected - resumed)
    tally.redone += max(0, last_logged - resumed)
    if resumed == expected:
        tally.recovered += 1
    else:
        tally.notes.append(f"resumed at step {resumed}, expected {expected}")


def after_fault(tally: Tally, config_file: str, workdir: str, timeout: float, *, expected_resume: int | None = None,
                exit_status: int | None = None, proc=None) -> None:
    """Books one fault and runs the command again to the end."""
    tally.faults += 1
    if proc is not None and exit_status is not None and proc.returncode != exit_status:
        tally.mismatches += 1
        tally.notes.append(f"exit status {proc.returncode}, expected {exit_status}")
    last_logged = max(logged_steps(workdir), default=0)
    expected = expected_resume if expected_resume is not None else max(complete_checkpoints(workdir), default=0)
    rerun = run_to_end(config_file, workdir, timeout)
    if rerun.returncode != 0:
        tally.mismatches += 1
        tally.notes.append(f"rerun exited {rerun.returncode}: {rerun.stderr.strip().splitlines()[-1:]}")
        return
    check_resume(tally, rerun.stdout, expected, last_logged)


def compare(tally: Tally, workdir: str, reference: dict) -> None:
    """Final parameters bit for bit, and every step once in metrics.jsonl with the reference's values."""
    import numpy as np

    from llm_jax import metrics

    params = final_params(workdir)
    for name, value in reference["params"].items():
        if name not in params or not np.array_equal(params[name], value):
            tally.mismatches += 1
            tally.notes.append(f"parameter {name} differs")
    rows = [r for r in metrics.read_metrics(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    steps = [r["step"] for r in rows]
    if steps != reference["steps"]:
        tally.mismatches += 1
        tally.notes.append(f"logged steps {summarise(steps)} vs {summarise(reference['steps'])}")
    for row in rows:
        expected = reference["rows"].get(row["step"])
        if expected is not None and without_time(row) != expected:
            tally.mismatches += 1
            tally.notes.append(f"step {row['step']} metrics differ")


def summarise(steps: list[int]) -> str:
    duplicates = sorted({s for s in steps if steps.count(s) > 1})
    return f"{len(steps)} lines" + (f", duplicated {duplicates}" if duplicates else "")


def without_time(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIME_KEYS}


def final_params(workdir: str) -> dict:
    import jax

    from llm_jax import train

    _, params = train.load_run(workdir)
    return {jax.tree_util.keystr(path): value for path, value in
            jax.tree_util.tree_leaves_with_path(jax.device_get(params))}


def reference_run(config_file: str, root: str, timeout: float) -> dict:
    from llm_jax import metrics

    workdir = os.path.join(root, "reference")
    proc = run_to_end(config_file, workdir, timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed: {proc.stderr.strip().splitlines()[-3:]}")
    rows = [r for r in metrics.read_metrics(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    return {"params": final_params(workdir), "steps": [r["step"] for r in rows],
            "rows": {r["step"]: without_time(r) for r in rows}}


# ----------------------------------------------------------------------------------------------
# Scenarios
# ----------------------------------------------------------------------------------------------

def wait_for_step(proc, output_path: str, workdir: str, step: int, timeout: float) -> None:
    """Waits until the run has started (its "workdir ..." line: by then it has chosen its
    checkpoint, and a moment later it drops the metrics lines logged after it) and has logged
    `step`, or has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and "workdir " not in open(output_path).read():
        time.sleep(0.01)
    time.sleep(0.5)  # the stale lines of the killed run are dropped right after that line
    while time.monotonic() < deadline and proc.poll() is None:
        if max(logged_steps(workdir), default=0) >= step:
            return
        time.sleep(0.01)


def random_kills(args, config_file, root, reference) -> Tally:
    """SIGKILL after a random step and a random fraction of a second more, then the same command
    again, which is itself killed in turn; when a run reaches the end, kills go on in a new workdir."""
    tally = Tally("random SIGKILL")
    rng = random.Random(args.seed)
    workdirs = iter(os.path.join(root, f"random_kills_{i}") for i in range(args.random_kills + 1))
    workdir = next(workdirs)
    pending = None  # (complete checkpoint, last logged step) at the last kill, for the next run to match
    last_start = None
    for attempt in range(4 * args.random_kills):
        if tally.faults == args.random_kills:
            break
        # Within two checkpoint intervals of where the run resumes: the kills walk through the whole
        # run (steps, evals, saves) instead of piling up near its end.
        start = max(complete_checkpoints(workdir), default=0)
        target = rng.randint(min(start + 1, args.num_steps), min(start + 2 * args.checkpoint_every, args.num_steps))
        # After a kill that gained no checkpoint, the next kill waits past the next checkpoint, and
        # near the end (where the last steps, eval and save fit in the random delay) the run is
        # left to finish: the kills do not pile up in one place.
        stalled = pending is not None and start == last_start
        last_start = start
        if stalled and start + args.checkpoint_every < args.num_steps:
            target, stalled = start + args.checkpoint_every + 1, False
        output_path = os.path.join(root, f"random_kills.{attempt}.out")
        with open(output_path, "w") as output:
            proc = subprocess.Popen(main_command(config_file, workdir), stdout=output, stderr=subprocess.STDOUT,
                                    env=child_env(), cwd=_REPO_ROOT)
            if stalled:
                proc.wait(timeout=args.timeout)
            else:
                wait_for_step(proc, output_path, workdir, target, args.timeout)
                time.sleep(rng.uniform(0.0, 0.3))  # anywhere in the next step(s), saves and evals included
                proc.kill()
                proc.wait()
        if pending is not None:
            check_resume(tally, open(output_path).read(), *pending)
            pending = None
        if proc.returncode == 0:  # it reached the end before the kill
            compare(tally, workdir, reference)
            workdir = next(workdirs)
            continue
        tally.faults += 1
        pending = (max(complete_checkpoints(workdir), default=0), max(logged_steps(workdir), default=0))
    if pending is not None:
        rerun = run_to_end(config_file, workdir, args.timeout)
        if rerun.returncode != 0:
            tally.mismatches += 1
            tally.notes.append(f"rerun exited {rerun.returncode}: {rerun.stderr.strip().splitlines()[-1:]}")
            return tally
        check_resume(tally, rerun.stdout, *pending)
    compare(tally, workdir, reference)
    return tally


def hooked(name: str, hook: str, *, exit_status: int):
    def scenario(args, config_file, root, reference) -> Tally:
        tally = Tally(name)
        workdir = os.path.join(root, hook.replace(":", "_"))
        proc = subprocess.run(hooked_command(config_file, workdir, hook), capture_output=True, text=True,
                              timeout=args.timeout, env=child_env(), cwd=_REPO_ROOT)
        after_fault(tally, config_file, workdir, args.timeout, exit_status=exit_status, proc=proc)
        compare(tally, workdir, reference)
        return tally
    return scenario


def damaged_checkpoint(args, config_file, root, reference) -> Tally:
    """Stops a run by SIGTERM mid-way, damages its newest checkpoint in each way in turn, and
    checks the rerun resumes from the one before (which it must: the damaged steps come back)."""
    from llm_jax import checkpoint

    tally = Tally("damaged checkpoint")
    damages = {"flip": flip_a_byte, "truncate": lambda p: open(p, "r+b").truncate(10), "delete": os.remove}
    for i, label in enumerate(args.damages.split(",")):
        if label not in damages:
            raise SystemExit(f"--damages: unknown {label!r}; choose from {list(damages)}")
        damage = damages[label]
        workdir = os.path.join(root, f"damaged_{i}")
        stop_at = args.checkpoint_every * 2 + 1
        proc = subprocess.run(hooked_command(config_file, workdir, f"sigterm_at_step:{stop_at}"), capture_output=True,
                              text=True, timeout=args.timeout, env=child_env(), cwd=_REPO_ROOT)
        complete = complete_checkpoints(workdir)
        if proc.returncode != PREEMPTED or len(complete) < 2:
            tally.mismatches += 1
            tally.notes.append(f"{label}: setup run exited {proc.returncode} with checkpoints {complete}")
            continue
        newest = os.path.join(workdir, "checkpoints", str(complete[-1]))
        damage(largest_array_file(newest))
        after_fault(tally, config_file, workdir, args.timeout, expected_resume=complete[-2])
        if not os.path.isdir(newest + checkpoint.CORRUPT_SUFFIX):
            tally.mismatches += 1
            tally.notes.append(f"{label}: {newest} was not set aside")
        compare(tally, workdir, reference)
    return tally


def flip_a_byte(path: str) -> None:
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[len(data) // 2] ^= 0xFF
        f.seek(0)
        f.write(bytes(data))


def largest_array_file(folder: str) -> str:
    files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(folder, "state"))
             for name in names if f"{os.sep}d{os.sep}" in os.path.join(root, name)]
    return max(files, key=os.path.getsize)


def snapshot(workdir: str) -> dict:
    """What a failed command must leave as it was: every checkpoint file, the metrics and config."""
    files = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            if name in ("metrics.jsonl", "config.json") or f"{os.sep}checkpoints{os.sep}" in path:
                with open(path, "rb") as f:
                    files[os.path.relpath(path, workdir)] = hash(f.read())
    return files


def bad_inputs(root: str, workdir: str) -> list[tuple[str, list[str], str, str]]:
    """(label, extra flags, workdir to run in, pattern the one error line must match). Some run
    against `workdir`, a run with checkpoints; the data and init_from cases in fresh workdirs."""
    from llm_jax.data import tokenizer as tokenizer_lib

    fresh = lambda label: os.path.join(root, "bad_input_" + label.replace(" ", "_"))  # noqa: E731
    empty, bad_jsonl = os.path.join(root, "empty.txt"), os.path.join(root, "bad.jsonl")
    open(empty, "w").close()
    with open(bad_jsonl, "w") as f:
        f.write('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n{"prompt": "e", \n')
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 7))) for _ in range(300)]
    spm = tokenizer_lib.train_sentencepiece([" ".join(rng.choices(words, k=2000))], vocab_size=300,
                                            output_prefix=os.path.join(root, "spm300"))
    return [
        ("value of the wrong type", ["--config.train.num_steps=abc"], workdir, r"--config\.train\.num_steps=abc"),
        ("unknown key", ["--config.model.nope=1"], workdir, r"no field 'nope'"),
        ("value out of range", ["--config.train.num_steps=-5"], workdir, r"train\.num_steps must be >= 1"),
        ("inconsistent mesh", ["--config.mesh.data=3"], workdir, r"mesh"),
        ("workdir of another config", ["--config.optimizer.learning_rate=0.5"], workdir,
         r"different config \(optimizer\.learning_rate"),
        ("unreadable corpus", ["--config.data.files=/nonexistent/*.txt", "--config.data.tfds_data_dir="
                               + os.path.join(root, "tfds_missing")], fresh("unreadable corpus"), r"data\.files"),
        ("empty corpus", [f"--config.data.files={empty}", "--config.data.tfds_data_dir="
                          + os.path.join(root, "tfds_empty")], fresh("empty corpus"), re.escape(empty)),
        ("malformed JSONL", ["--config.task=sft", f"--config.data.train_file={bad_jsonl}",
                             f"--config.data.eval_file={bad_jsonl}"], fresh("malformed jsonl"),
         re.escape(bad_jsonl) + ":3"),
        ("init_from another architecture", [f"--config.train.init_from={workdir}", "--config.model.d_model=96"],
         fresh("other architecture"), r"train\.init_from: parameter"),
        ("tokenizer of another vocabulary", [f"--config.train.init_from={workdir}",
                                             "--config.data.tokenizer=sentencepiece",
                                             f"--config.data.tokenizer_path={spm}"],
         fresh("other vocabulary"), r"train\.init_from: .*another vocabulary"),
    ]


def bad_input(args, config_file, root, reference) -> Tally:
    """Each bad input against a run that has checkpoints (or in a fresh workdir): exit status 1,
    one `error:` line naming the field, file or line, nothing of the run changed; then the right
    command resumes where the run stopped and ends as the reference did."""
    tally = Tally("bad input")
    workdir = os.path.join(root, "bad_input")
    stop_at = args.checkpoint_every * 2 + 1
    subprocess.run(hooked_command(config_file, workdir, f"sigterm_at_step:{stop_at}"), capture_output=True,
                   timeout=args.timeout, env=child_env(), cwd=_REPO_ROOT)
    before = snapshot(workdir)
    for label, flags, target, pattern in bad_inputs(root, workdir):
        tally.faults += 1
        proc = subprocess.run(main_command(config_file, target) + flags, capture_output=True, text=True,
                              timeout=args.timeout, env=child_env(), cwd=_REPO_ROOT)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        untouched = snapshot(workdir) == before and (target == workdir or not complete_checkpoints(target))
        if proc.returncode == 1 and len(errors) == 1 and re.search(pattern, errors[0]) and untouched:
            tally.recovered += 1
        else:
            tally.mismatches += 1
            tally.notes.append(f"{label}: exit {proc.returncode}, {errors or proc.stderr.strip().splitlines()[-1:]}"
                               + ("" if untouched else ", the run's files changed"))
    rerun = run_to_end(config_file, workdir, args.timeout)
    tally.lost += max(0, stop_at - resumed_step(rerun.stdout))
    compare(tally, workdir, reference)
    return tally


SCENARIOS = {
    "random_sigkill": random_kills,
    "sigkill_mid_save": hooked("SIGKILL mid-save", "sigkill_in_save:2", exit_status=-signal.SIGKILL),
    "sigkill_pre_manifest": hooked("SIGKILL pre-manifest", "sigkill_before_manifest:2",
                                   exit_status=-signal.SIGKILL),
    "damaged_checkpoint": damaged_checkpoint,
    "sigterm_mid_eval": hooked("SIGTERM mid-eval", "sigterm_in_eval:1", exit_status=PREEMPTED),
    "sigterm_mid_save": hooked("SIGTERM mid-save", "sigterm_in_save:2", exit_status=PREEMPTED),
    "disk_full_mid_save": hooked("full disk mid-save", "disk_full_in_save:8", exit_status=1),
    "bad_input": bad_input,
}


# ----------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------

def format_table(rows: list[dict]) -> str:
    width = max(len(r["scenario"]) for r in rows + [{"scenario": "total"}])
    lines = [f"{'scenario':<{width}} | " + " | ".join(COLUMNS), "-" * (width + 3 + sum(len(c) + 3 for c in COLUMNS))]
    totals = {c: sum(r[c] for r in rows) for c in COLUMNS}
    for row in rows + [{"scenario": "total", **totals}]:
        lines.append(f"{row['scenario']:<{width}} | " + " | ".join(f"{row[c]:>{len(c)}}" for c in COLUMNS))
    return "\n".join(lines)


def run(args) -> list[dict]:
    names = list(SCENARIOS) if args.scenarios == "all" else [s.strip() for s in args.scenarios.split(",")]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"--scenarios: unknown {unknown}; choose from {list(SCENARIOS)}")
    root = args.workroot or tempfile.mkdtemp(prefix="llm_jax_faults_")
    os.makedirs(root, exist_ok=True)
    try:
        config_file = write_config(root, args.num_steps, args.checkpoint_every)
        reference = reference_run(config_file, root, args.timeout)
        rows = []
        for name in names:
            started = time.perf_counter()
            row = SCENARIOS[name](args, config_file, root, reference).row()
            row["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            print(f"{row['scenario']}: {row['faults injected']} fault(s), {row['mismatches']} mismatch(es), "
                  f"{row['seconds']:.0f} s" + (f" ({row['notes']})" if row["notes"] else ""), flush=True)
        return rows
    finally:
        if not args.workroot:
            shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    rows = run(args)
    print()
    print(format_table(rows))
    print(f"\n{args.num_steps} steps per run, a checkpoint every {args.checkpoint_every}; "
          f"{time.perf_counter() - started:.0f} s in all")
    if args.json:
        write_json_record(args.json, " ".join(sys.argv), args, machine_info(), rows=rows)
    failed = sum(r["mismatches"] + r["checkpointed steps lost"] for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
