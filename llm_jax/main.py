"""Runs a job: python -m llm_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

`--config` takes a config file with an optional argument (`configs/quickstart.py:size=tiny`) and
any field can be overridden with `--config.optimizer.learning_rate=1e-3`.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from llm_jax import online_dpo, preemption, stages, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<job>.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go; a run resumes from it.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every checkpoint step at INFO; the loop prints what a user needs. -v 0 shows it.
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    # Online DPO alternates sampling and training, and the pipeline chains runs of every stage, so
    # each has a driver of its own; every other task runs through the one training loop.
    runners = {"online_dpo": online_dpo.run, "pipeline": stages.run}
    runner = runners.get(config.task, train.run)
    try:
        runner(config, _WORKDIR.value)
    except preemption.Preempted as stop:
        print(f"preempted: {stop}", file=sys.stderr, flush=True)
        sys.exit(preemption.EXIT_CODE)


if __name__ == "__main__":
    app.run(main)
