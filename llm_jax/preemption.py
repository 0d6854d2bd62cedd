"""Preemption: SIGTERM (a TPU VM or cluster scheduler taking the machine back) or SIGINT (Ctrl-C)
asks the loop to stop after the step it is running, write a checkpoint and exit with
`EXIT_CODE`, so the same command resumes from there.

A signal handler only sets a flag: the loop reads it between steps, so a step, a checkpoint write
or an eval is never cut in half. A second signal while the first is being honoured stops at once
(the default action), for a user who really means it. With several processes the flag is agreed
on with one all-gather at steps the caller chooses, so every process saves the same step.
"""
from __future__ import annotations

import signal
import threading

import numpy as np

# sysexits' EX_TEMPFAIL, "temporary failure; the user is invited to retry": a wrapper script or
# scheduler can tell "preempted, run me again" from success (0) and from errors (1).
EXIT_CODE = 75


class Preempted(Exception):
    """Raised by the loop after it saved `step` because a stop signal arrived."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {step} is saved and "
                         f"the same command resumes from it")
        self.step = step
        self.signal_name = signal_name


class StopSignals:
    """Context manager: while inside, SIGTERM / SIGINT set `received` instead of killing the process.

    Handlers can only be installed from the main thread; elsewhere (a test runner's worker thread)
    this does nothing and signals keep their usual effect.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self._signals = tuple(signals)
        self._previous: dict = {}
        self.received: str | None = None

    def _handle(self, signum, frame):
        del frame
        if self.received is not None:  # second signal: restore the default and act on it now
            self.__exit__(None, None, None)
            signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self._signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def agreed(self, process_count: int) -> str | None:
        """The signal any process received (its name), the same answer on every process.

        Single process: the local flag, free. Several: one all-gather, a synchronisation point, so
        the caller asks only at steps every process reaches together (the loop: its log steps).
        """
        if process_count == 1:
            return self.received
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.received is not None))
        if not np.any(flags):
            return None
        return self.received or "a stop signal on another process"
