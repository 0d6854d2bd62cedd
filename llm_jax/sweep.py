"""Sweeps: a base config plus a list of overrides, run here one after another, printed as one
command line per run for any scheduler, or written as a SLURM job array; then collected into a CSV.

A sweep file `experiments/<study>.py` defines `get_sweep(arg)` -> a dict (or `Sweep`): `config`
(a config file[:arg]), `runs` (override dicts, e.g. from `product` / `zip_` / `chain`; a run may
set its `name` and its own `config`), optional `name` (default: the file's stem) and `fixed`
(fields of every run, left out of run names). `arg` picks presets (`:scale=tpu`), so one file
serves a CPU smoke test and an accelerator study. Commands (see example_sweep.py):

    python -m llm_jax.sweep run|commands|collect experiments/<study>.py[:arg] --root=runs/sweeps
    python -m llm_jax.sweep slurm experiments/<study>.py --out=job.sbatch --gpus_per_task=1

Each run is `python -m llm_jax.main` in `<root>/<sweep name>/<run name>` (output in `sweep.log`,
status in `sweep_run.json`). `run` skips finished runs (metrics reach train.num_steps, or an attempt
exited 0), reruns the others (main resumes a workdir), records a failed run (`sweep_status.json`,
the CSV's `error`) and goes on; a preempted run (exit 75) or SIGINT/SIGTERM stops it with status 75.
"""
from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import functools
import hashlib
import importlib.util
import itertools
import json
import math
import operator
import os
import re
import shlex
import signal
import subprocess
import sys
import time

from llm_jax import config_lib, preemption

PREEMPTED = preemption.EXIT_CODE  # 75: a run saved its step on SIGTERM/SIGINT; the same command resumes it
MARKER, LOG, STATUS, RESULTS = "sweep_run.json", "sweep.log", "sweep_status.json", "results.csv"
SPECIAL = ("name", "config")  # keys of a run that are not config fields
SELECTED = ("model.size", "model.d_model", "model.n_layers", "model.n_heads", "data.seq_len",
            "data.batch_size", "train.num_steps", "optimizer.learning_rate")


class SweepError(ValueError):
    """A bad sweep file or command line; the message names the file and key."""


@dataclasses.dataclass
class Sweep:
    config: str  # "configs/<job>.py[:arg]", from the working directory (as main's --config)
    runs: list  # override dicts {"optimizer.learning_rate": 1e-3, ...}, optionally with name/config
    name: str = ""
    fixed: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Run:
    index: int
    name: str
    config: str  # config file[:arg], as main's --config takes it
    overrides: dict  # the run's own fields
    fixed: dict  # the sweep's fields (and --set), applied before `overrides`
    workdir: str
    resolved: object  # the ConfigDict the run trains with

    def command(self, python: str = "python") -> list[str]:
        fields = {**self.fixed, **self.overrides}
        return [python, "-m", "llm_jax.main", f"--config={self.config}", f"--workdir={self.workdir}",
                *(f"--config.{k}={v}" for k, v in fields.items())]


# ------------------------------------------------------------------------------- sweep files

def _runs_of(factor) -> list[dict]:
    if isinstance(factor, dict):  # axes: {key: [values]} (a single value is a one-value axis)
        values = [v if isinstance(v, (list, tuple)) else [v] for v in factor.values()]
        return [dict(zip(factor, combo)) for combo in itertools.product(*values)]
    return [dict(run) for run in factor]


def product(*factors) -> list[dict]:
    """Every combination of the factors, each `{key: [values]}` or a list of runs; the first varies
    slowest: `product({"model.size": ["nano", "micro"]}, {"optimizer.learning_rate": [1e-3, 3e-3]})`."""
    return [dict(kv for run in combo for kv in run.items()) for combo in itertools.product(*map(_runs_of, factors))]


def zip_(axes: dict) -> list[dict]:
    """Values side by side: `zip_({"model.size": ["nano", "micro"], "optimizer.learning_rate": [3e-3, 1e-3]})`."""
    lengths = {k: len(v) for k, v in axes.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"zip_ needs lists of one length, got {lengths}")
    return [dict(zip(axes, values)) for values in zip(*axes.values())]


def chain(*run_lists) -> list[dict]:
    """One list of runs after the other."""
    return [dict(run) for runs in run_lists for run in runs]


def parse_arg(arg: str | None, **defaults) -> dict:
    """`scale=tpu,steps=100` over `defaults`, each value of its default's type; unknown keys fail."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown sweep argument {key!r}; known: {sorted(defaults)}")
        kind = type(defaults[key])
        values[key] = value if kind is str else kind(ast.literal_eval(value))
    return values


def scale_of(arg: str | None, presets, default: str = "cpu") -> str:
    """The `scale=` argument of a study (`:scale=tpu`), checked against its presets' names."""
    scale = parse_arg(arg, scale=default)["scale"]
    if scale not in presets:
        raise ValueError(f"scale must be one of {sorted(presets)}, got {scale!r}")
    return scale


def run_name(parts) -> str:
    """`size=micro,learning_rate=0.001` from (key, value) pairs: deterministic, a safe folder name."""
    name = ",".join(f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}" for k, v in parts) or "base"
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    return name if len(name) <= 120 else name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]


def _load(path: str, function: str, what: str):
    if not os.path.isfile(path):
        raise SweepError(f"{what} {path} not found")
    try:
        spec = importlib.util.spec_from_file_location(f"_sweep_{hashlib.sha1(path.encode()).hexdigest()[:8]}", path)
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(module)
    except Exception as e:
        raise SweepError(f"{what} {path} does not load ({type(e).__name__}: {e})") from e
    if not callable(getattr(module, function, None)):
        raise SweepError(f"{what} {path} defines no {function}(arg)")
    return getattr(module, function)


def _split(spec: str) -> tuple[str, str]:
    path, sep, arg = spec.partition(".py:")
    return (path + ".py", arg) if sep else (spec, "")


def _parse_sets(sets) -> dict:
    """`--set key=value` pairs; values are Python literals where they parse (1e-3, True), else strings."""
    fields = {}
    for item in sets or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise SweepError(f"--set {item!r}: expected key=value")
        try:
            fields[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            fields[key] = value
    return fields


def _set(config, fields: dict, where: str) -> None:
    for key, value in fields.items():
        try:
            config_lib.set_fields(config, {key: value})
        except (KeyError, AttributeError, TypeError, ValueError) as e:
            wrong_type = isinstance(e, TypeError) and "override" in str(e)
            problem = str(e).splitlines()[0] if wrong_type else "the config has no such field"
            raise SweepError(f"{where} sets {key}={value!r}: {problem}") from e


def load(spec: str, root: str = "runs/sweeps", sets=()) -> tuple[Sweep, list[Run]]:
    """The runs of `path[:arg]`, each checked against its config, before anything runs."""
    path, arg = _split(spec)
    get_sweep = _load(path, "get_sweep", "sweep file")
    try:
        sweep = get_sweep(arg)
        sweep = sweep if isinstance(sweep, Sweep) else Sweep(**sweep)
    except Exception as e:
        raise SweepError(f"sweep file {path}: get_sweep({arg!r}) failed ({type(e).__name__}: {e})") from e
    sweep.name = sweep.name or os.path.splitext(os.path.basename(path))[0]
    if not sweep.runs or not all(isinstance(run, dict) for run in sweep.runs):
        raise SweepError(f"sweep file {path}: `runs` must be a non-empty list of dicts")
    fixed = {**sweep.fixed, **_parse_sets(sets)}
    keys = list(dict.fromkeys(k for run in sweep.runs for k in run if k not in SPECIAL))
    leaf = {k: k.rsplit(".", 1)[-1] for k in keys}  # short names in run names, unless two keys share one
    short = {k: leaf[k] if list(leaf.values()).count(leaf[k]) == 1 else k for k in keys}
    configs, runs, seen = {}, [], {}
    for index, run in enumerate(sweep.runs):
        config = run.get("config", sweep.config)
        file, config_arg = _split(config)
        if config not in configs:
            get_config = _load(file, "get_config", f"sweep file {path}: config")
            try:
                configs[config] = get_config(config_arg) if config_arg else get_config()
            except Exception as e:
                raise SweepError(f"sweep file {path}: config {config} failed ({type(e).__name__}: {e})") from e
        resolved = configs[config].copy_and_resolve_references()
        resolved.lock()  # as main's --config does: unknown keys fail
        overrides = {k: v for k, v in run.items() if k not in SPECIAL}
        _set(resolved, fixed, f"sweep file {path}: `fixed` (or --set)")
        _set(resolved, overrides, f"sweep file {path}: run {index}")
        parts = [("config", config_arg or os.path.basename(file))] if "config" in run else []
        name = str(run.get("name") or run_name(parts + [(short[k], v) for k, v in overrides.items()]))
        if name in seen:
            raise SweepError(f"sweep file {path}: runs {seen[name]} and {index} have the same name {name!r}; "
                             f"give them different overrides or a `name`")
        seen[name] = index
        runs.append(Run(index, name, config, overrides, fixed, os.path.join(root, sweep.name, name), resolved))
    return sweep, runs


def resolve(config: str, fields: dict | None = None):
    """The ConfigDict of a config file[:arg] with dotted `fields` set, as a run of a sweep gets it."""
    file, arg = _split(config)
    resolved = _load(file, "get_config", "config")(*([arg] if arg else [])).copy_and_resolve_references()
    resolved.lock()
    _set(resolved, fields or {}, f"config {config}")
    return resolved


def steps_for_flops(config: str, fields: dict, flops: float) -> int:
    """Training steps that spend `flops` (C, as the CSV's `flops` column counts it) on the model and
    batch of `config` + `fields`: an IsoFLOP sweep sizes each run with it."""
    from llm_jax import metrics
    resolved = resolve(config, fields)
    cfg, _ = _model(resolved)
    per_step = metrics.flops_per_token(cfg, resolved.data.seq_len) * resolved.data.batch_size * resolved.data.seq_len
    if flops < per_step:
        raise SweepError(f"{flops:.3g} FLOPs is less than one step ({per_step:.3g}) of {config} with {fields}")
    return round(flops / per_step)


# ------------------------------------------------------------------------------- running

def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2)
    os.replace(path + ".tmp", path)


def _metrics(workdir: str) -> list[dict]:
    from llm_jax import metrics  # imports jax (no backend is started: the runs need the devices)
    path = os.path.join(workdir, metrics.METRICS_FILE)
    try:
        return metrics.read_metrics(path) if os.path.exists(path) else []
    except ValueError:
        return []


def is_finished(run: Run) -> bool:
    """Its metrics reach train.num_steps, or an attempt at this many steps exited 0."""
    marker, steps = _read_json(os.path.join(run.workdir, MARKER)), run.resolved.train.num_steps
    if marker.get("status") == "finished" and marker.get("num_steps") == steps:
        return True
    return max((r.get("step", 0) for r in _metrics(run.workdir)), default=0) >= steps


_stop = {"signals": 0}


def _on_signal(signum, frame):
    """The run is in our process group, so it got the signal too (Ctrl-C, scancel, a VM shutting
    down) and is saving its step: stop after it."""
    _stop["signals"] += 1
    print(f"sweep: {signal.Signals(signum).name}: stopping after the current run", file=sys.stderr, flush=True)


class _StopAfterRun:
    def __enter__(self):
        _stop["signals"] = 0
        self.handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc_info):
        [signal.signal(s, handler) for s, handler in self.handlers.items()]


def run_child(command: list[str], log_path: str, echo: bool = True) -> tuple[int, str]:
    """Runs `command` with its output appended to `log_path` (and shown when `echo`); returns its
    exit status and its last `error:` line (else its last line)."""
    last = error = ""
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        for line in proc.stdout:
            log.write(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
            if line.strip():
                last = line.strip()
                error = last if last.startswith("error:") else error
        status = proc.wait()
    if status < 0:
        return status, f"killed by {signal.Signals(-status).name}" + (f" (last line: {last})" if last else "")
    return status, error or last


def run_one(run: Run, runner=run_child, echo: bool = True, total: int = 0) -> int | None:
    """Runs `run` unless it is finished (then None); returns the exit status and records it."""
    label = f"sweep: [{run.index + 1}/{total or '?'}] {run.name}"
    if is_finished(run):
        print(f"{label}: finished earlier, skipped", flush=True)
        return None
    path = os.path.join(run.workdir, MARKER)
    marker = _read_json(path)
    marker.update(status="running", num_steps=run.resolved.train.num_steps, command=shlex.join(run.command()),
                  attempts=marker.get("attempts", 0) + 1, exit_status=None, error="")
    _write_json(path, marker)
    print(f"{label}: running (output in {os.path.join(run.workdir, LOG)})", flush=True)
    start = time.monotonic()
    status, last = runner(run.command(sys.executable), os.path.join(run.workdir, LOG), echo)
    elapsed = time.monotonic() - start
    state = "finished" if status == 0 else "preempted" if status == PREEMPTED else "failed"
    marker.update(status=state, exit_status=status, error="" if status == 0 else last,
                  wall_time_s=round(marker.get("wall_time_s", 0.0) + elapsed, 1))
    _write_json(path, marker)
    print(f"{label}: {state} in {elapsed:.0f} s" + (f" (exit status {status}: {last})" if status else ""), flush=True)
    return status


def run_sweep(sweep: Sweep, runs: list[Run], root: str, runner=run_child, echo: bool = True) -> int:
    """Runs the unfinished runs in turn, then collects; 75 if preempted, 1 if a run failed, else 0."""
    failed, status = [], None
    with _StopAfterRun():
        for run in runs:
            if _stop["signals"]:
                break
            status = run_one(run, runner, echo, len(runs))
            write_status(sweep, runs, root)
            failed += [run.name] if status not in (None, 0, PREEMPTED) else []
            if status == PREEMPTED:
                break
        preempted = status == PREEMPTED or _stop["signals"] > 0
    out = collect(sweep, runs, root)
    print(f"sweep {sweep.name}: " + ("stopped (preempted): the same command resumes it; " if preempted else "")
          + (f"{len(failed)} failed ({', '.join(failed)}); " if failed else "") + f"results in {out}", flush=True)
    return PREEMPTED if preempted else 1 if failed else 0


def write_status(sweep: Sweep, runs: list[Run], root: str) -> dict:
    """`<root>/<name>/sweep_status.json`: each run's status, exit status and error, and the failures."""
    status = {}
    for run in runs:
        marker = _read_json(os.path.join(run.workdir, MARKER))
        # finished; running (or killed), failed, preempted; incomplete (run elsewhere); pending
        state = "finished" if is_finished(run) else marker.get("status") if marker.get("status") not in (
            None, "finished") else "incomplete" if os.path.isdir(run.workdir) else "pending"
        status[run.name] = {"status": state,
                            **{k: marker.get(k) for k in ("exit_status", "error", "attempts", "wall_time_s")}}
    summary = {"sweep": sweep.name, "failures": [n for n, s in status.items() if s["status"] == "failed"],
               "runs": status}
    _write_json(os.path.join(root, sweep.name, STATUS), summary)
    return summary


# ------------------------------------------------------------------------------- collecting

def _model(config):
    """(TransformerConfig, parameter counts or {}), from shapes alone (scaling.count_params)."""
    from llm_jax import train
    from llm_jax.data import tokenizer as tokenizer_lib
    try:
        vocab = tokenizer_lib.get_tokenizer(config.data.tokenizer, config.data.tokenizer_path).vocab_size
    except (OSError, ValueError, RuntimeError):  # a SentencePiece model not there (yet)
        vocab = None
    cfg = train.model_config(config, vocab or 256)
    return cfg, (_counts(cfg) if vocab else {})


@functools.lru_cache(maxsize=None)
def _counts(cfg) -> dict[str, int]:
    from llm_jax import scaling
    return scaling.count_params(cfg)


def _flops(cfg, tokens, seq_len: int):
    """C of the run (scaling.training_flops), blank until it has logged its tokens."""
    from llm_jax import scaling
    return scaling.training_flops(cfg, tokens, seq_len) if isinstance(tokens, (int, float)) and tokens else ""


def collect(sweep: Sweep, runs: list[Run], root: str, out: str = "") -> str:
    """One CSV row per run: its status, swept and selected config fields, parameter counts, final
    metrics, then the sweep's fixed fields. Returns the CSV's path."""
    out = out or os.path.join(root, sweep.name, RESULTS)
    status = write_status(sweep, runs, root)["runs"]
    swept = list(dict.fromkeys(k for run in runs for k in run.overrides))
    rows = []
    for run in runs:
        cfg, counts = _model(run.resolved)
        records = _metrics(run.workdir)
        evals = [v for v in (r.get("eval/loss") for r in records) if isinstance(v, float) and math.isfinite(v)]
        last = {k: v for r in records for k, v in r.items()}  # each metric's last value
        row = {"run": run.name, **{k: "" if v is None else v for k, v in status[run.name].items()}}
        field = lambda key: functools.reduce(operator.getitem, key.split("."), run.resolved)  # noqa: E731
        row.update({k: field(k) for k in dict.fromkeys(swept + list(SELECTED))})
        row.update({"model.d_model": cfg.d_model, "model.n_layers": cfg.n_layers, "model.n_heads": cfg.n_heads,
                    "params": counts.get("total", ""), "params_non_embedding": counts.get("non_embedding", ""),
                    "final_step": max((r.get("step", 0) for r in records), default=""),
                    "tokens_seen": last.get("train/tokens_seen", ""),
                    "flops": _flops(cfg, last.get("train/tokens_seen"), run.resolved.data.seq_len),
                    "train_loss": last.get("train/loss", ""),
                    "eval_loss": last.get("eval/loss", ""), "best_eval_loss": min(evals, default=""),
                    "config": run.config})
        row.update({k: field(k) for k in run.fixed if k not in row})
        rows.append({**row, "workdir": run.workdir})
    columns = list(dict.fromkeys(k for row in rows for k in row))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return out


# ------------------------------------------------------------------------------- schedulers

def slurm_script(spec: str, sweep: Sweep, runs: list[Run], root: str, sets=(), sbatch=None, max_parallel=0,
                 setup="") -> str:
    """An `sbatch` job array: task i runs `python -m llm_jax.sweep run-one <spec> --index=i`.
    `sbatch`: more options, e.g. {"partition": "gpu", "gpus-per-task": 1, "time": "4:00:00"}."""
    options = {"job-name": sweep.name, "array": f"0-{len(runs) - 1}" + (f"%{max_parallel}" if max_parallel else ""),
               "output": f"{os.path.abspath(os.path.join(root, sweep.name))}/slurm-%A_%a.out", "ntasks": 1,
               **(sbatch or {})}
    command = ["python", "-m", "llm_jax.sweep", "run-one", spec, f"--root={root}", *(f"--set={s}" for s in sets)]
    return "\n".join([
        "#!/bin/bash",
        f"# Sweep {sweep.name}: {len(runs)} runs of {spec}, one per array task. Submitting again skips",
        "# finished runs and resumes interrupted ones; `python -m llm_jax.sweep collect` gathers the results.",
        *(f"#SBATCH --{k}={v}" for k, v in options.items() if v),
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        *([setup] if setup else []),
        f'exec {shlex.join(command)} --index="$SLURM_ARRAY_TASK_ID"', ""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_jax.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "run-one", "commands", "slurm", "collect"))
    parser.add_argument("sweep", help="experiments/<study>.py[:arg]")
    parser.add_argument("--root", default="runs/sweeps", help="runs go to <root>/<sweep name>/<run name>")
    parser.add_argument("--set", action="append", default=[], help="key=value, set in every run (repeatable)")
    parser.add_argument("--index", type=int, help="run-one: which run (from 0)")
    parser.add_argument("--out", default="", help="slurm: the script to write; collect: the CSV")
    parser.add_argument("--quiet", action="store_true", help="run: the runs' output only in their sweep.log")
    for flag in ("partition", "time", "mem", "setup"):
        parser.add_argument(f"--{flag}", default="", help="slurm" + (": a line run first" if flag == "setup" else ""))
    for flag in ("gpus_per_task", "cpus_per_task", "max_parallel"):
        parser.add_argument(f"--{flag}", type=int, default=0, help="slurm")
    args = parser.parse_args(argv)
    try:
        sweep, runs = load(args.sweep, args.root, args.set)
        if args.command == "run":
            return run_sweep(sweep, runs, args.root, echo=not args.quiet)
        if args.command == "run-one":
            if args.index is None or not 0 <= args.index < len(runs):
                raise SweepError(f"--index must be in 0..{len(runs) - 1}, got {args.index}")
            with _StopAfterRun():
                return run_one(runs[args.index], echo=not args.quiet, total=len(runs)) or 0
        if args.command == "commands":
            print("\n".join(shlex.join(run.command()) for run in runs))
        elif args.command == "slurm":
            if not args.out:
                raise SweepError("slurm needs --out=<script file>")
            os.makedirs(os.path.join(args.root, sweep.name), exist_ok=True)  # sbatch's --output folder
            sbatch = {k.replace("_", "-"): getattr(args, k) for k in ("partition", "gpus_per_task", "cpus_per_task",
                                                                        "time", "mem")}
            with open(args.out, "w") as f:
                f.write(slurm_script(args.sweep, sweep, runs, args.root, args.set, sbatch, args.max_parallel,
                                     args.setup))
            print(f"wrote {args.out} (sbatch --array=0-{len(runs) - 1}: {len(runs)} runs); submit: sbatch {args.out}")
        else:
            print(f"wrote {collect(sweep, runs, args.root, args.out)}")
        return 0
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
