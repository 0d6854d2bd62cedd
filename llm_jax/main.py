"""Runs a job: python -m llm_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

`--config` takes a config file with an optional argument (`configs/quickstart.py:size=tiny`) and
any field can be overridden with `--config.optimizer.learning_rate=1e-3`.

Bad input (a config key or value, a data file, a checkpoint, a workdir of another config, a full
disk, a loss that went NaN) ends the run with one line on stderr, `error: <message>` naming the
field, file or line, and exit status 1. Set `LLM_JAX_TRACEBACK=1` in the environment to get the
full traceback instead. A preempted run (SIGTERM/SIGINT) saves its step and exits with status 75
(`preemption.EXIT_CODE`): run the same command again to resume.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from llm_jax import checkpoint, online_dpo, preemption, stages, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<job>.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go; a run resumes from it.")
flags.mark_flags_as_required(["config", "workdir"])

TRACEBACK_ENV = "LLM_JAX_TRACEBACK"
# What the code raises for bad input: ValueError (config values, data files, checkpoints of another
# model; CorruptCheckpoint is one), OSError (unreadable or missing files, a full disk),
# CheckpointSaveError (a save failed; the previous checkpoint is intact), FloatingPointError (the
# loss went non-finite; the last good checkpoint is kept).
INPUT_ERRORS = (ValueError, OSError, checkpoint.CheckpointSaveError, FloatingPointError)


def _show_traceback() -> bool:
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def _lines(message) -> list[str]:
    return [line.strip() for line in str(message).splitlines() if line.strip()]


def one_line(message) -> str:
    """The first line of `message`, saying where the rest is when there is more."""
    lines = _lines(message) or ["(no message)"]
    return lines[0] + (f" (more with {TRACEBACK_ENV}=1)" if len(lines) > 1 else "")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def _unknown_key_message(error: Exception, argv) -> str:
    """ml_collections lets `--config.model.nope=1` escape flag parsing as a raw AttributeError or
    KeyError holding "'nope'" (and a "Did you mean" line): name the flag and the key."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    key, *hint = _lines(text) or ["?"]
    key = key.strip("'\"")
    flag = next((arg for arg in argv[1:] if arg.startswith("--config.")
                 and key in arg.split("=", 1)[0].removeprefix("--config.").split(".")), None)
    where = f"flag {flag}: " if flag else ""
    suggestion = f" ({hint[0][0].lower()}{hint[0][1:]})" if hint else ""
    return f"{where}the config has no field {key!r}{suggestion}"


def parse_flags(argv):
    """absl's flag parsing, with every error on one line: a bad value names its flag, an unknown
    `--config.a.b` names the key, and an error inside the config file gives its last line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, SyntaxError) as error:
        if _show_traceback():
            raise
        if isinstance(error, flags.Error):  # the config file's errors come with its traceback
            lines = _lines(error)
            _fail(lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}")
        if isinstance(error, SyntaxError):  # in the config file
            _fail(f"flag --config: {error.msg} ({error.filename}, line {error.lineno})")
        _fail(_unknown_key_message(error, argv))


def run_reporting_errors(runner, config, workdir: str):
    """`runner(config, workdir)`, turning bad input into one line and exit status 1 (the traceback
    with LLM_JAX_TRACEBACK=1) and preemption into exit status 75."""
    try:
        return runner(config, workdir)
    except preemption.Preempted as stop:
        print(f"preempted: {stop}", file=sys.stderr, flush=True)
        sys.exit(preemption.EXIT_CODE)
    except INPUT_ERRORS as error:
        if _show_traceback():
            raise
        _fail(one_line(str(error) or type(error).__name__))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every checkpoint step at INFO; the loop prints what a user needs. -v 0 shows it.
        logging.set_verbosity(logging.WARNING)
    try:
        config = _CONFIG.value
        task = config.task
    except OSError as error:  # config_flags defers a config file that fails to load to here
        if _show_traceback():
            raise
        _fail(f"flag --config: cannot load the config file ({_lines(error)[-1]})")
    # Online DPO alternates sampling and training, and the pipeline chains runs of every stage, so
    # each has a driver of its own; every other task runs through the one training loop.
    runners = {"online_dpo": online_dpo.run, "pipeline": stages.run}
    run_reporting_errors(runners.get(task, train.run), config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
