"""One training run, as `python -m llm_jax.main` makes it, with a fault planted inside it: the
child process of benchmarks/fault_injection.py for the faults that must strike mid-save, mid-eval
or at a chosen step.

    python benchmarks/fault_child.py --hook=sigkill_in_save:2 --config_file=job.py --workdir=run

`--hook=NAME:N`: sigkill_in_save / sigterm_in_save (the N-th save, while its data item is
written), sigkill_before_manifest (after Orbax's N-th save, before its manifest),
disk_full_in_save (step N's save meets ENOSPC), sigterm_in_eval (the N-th eval), sigterm_at_step
(while step N is prepared).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)


def fill_disk_during_save(step: int):
    """Patches Orbax's file writes (etils.epath) so that step `step`'s state metadata is half
    written and then fails with ENOSPC, as a full disk would; returns the undo function."""
    import errno

    from etils.epath import gpath

    real_open = gpath._GPath.open

    class FullDisk:
        def __init__(self, file, path):
            self._file, self._path = file, path

        def write(self, data):
            self._file.write(data[: len(data) // 2])
            self._file.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._file.close()

        def __getattr__(self, name):
            return getattr(self._file, name)

    def open_(self, mode="r", *args, **kwargs):
        file = real_open(self, mode, *args, **kwargs)
        if "w" in mode and self.name == "_METADATA" and f"{os.sep}{step}.orbax-checkpoint-tmp" in str(self):
            return FullDisk(file, str(self))
        return file

    gpath._GPath.open = open_
    return lambda: setattr(gpath._GPath, "open", real_open)


def nth_call(n: int, action, function):
    """`function`, except that its n-th call performs `action` first."""
    calls = [0]

    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            action()
        return function(*a, **k)
    return wrapped


def install_hook(hook: str) -> None:
    from llm_jax import checkpoint, train

    name, n = hook.split(":")
    n = int(n)
    kill = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    term = lambda: signal.raise_signal(signal.SIGTERM)  # noqa: E731
    grain_item = checkpoint._IteratorForGrainHandler
    if name in ("sigkill_in_save", "sigterm_in_save"):
        # The data item is written while the state item is being written: the save is half done.
        grain_item.get_state = nth_call(n, kill if name == "sigkill_in_save" else term, grain_item.get_state)
    elif name == "sigkill_before_manifest":
        checkpoint.write_manifest = nth_call(n, kill, checkpoint.write_manifest)
    elif name == "disk_full_in_save":  # n: the step whose save meets a full disk
        fill_disk_during_save(n)
    elif name == "sigterm_in_eval":
        train.evaluate = nth_call(n, term, train.evaluate)
    elif name == "sigterm_at_step":
        from llm_jax import sharding
        # Eval batches are placed first (train.eval_batches of them), then one call per step.
        sharding.shard_host_batch = nth_call(2 + n, term, sharding.shard_host_batch)
    else:
        raise ValueError(f"--hook: unknown fault {name!r}")


def child_main(args) -> int:
    """One run as `llm_jax.main` makes it (exit 75 when preempted, 1 with one line for bad input),
    with the fault of `--hook` planted."""
    import importlib.util

    from llm_jax import main as llm_main, train

    install_hook(args.hook)
    spec = importlib.util.spec_from_file_location("job", args.config_file)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    llm_main.run_reporting_errors(train.run, job.get_config(), args.workdir)
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hook", required=True, help="NAME:N, the fault to plant")
    p.add_argument("--config_file", required=True, help="a config file with get_config()")
    p.add_argument("--workdir", required=True)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(child_main(parse_args()))
