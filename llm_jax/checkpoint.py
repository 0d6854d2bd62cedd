"""Checkpoints: the train state and each process' data-iterator position, saved together.

Orbax's CheckpointManager writes each step into a temporary folder and renames it when complete,
so a crash mid-save never leaves a half-written "latest" step; it keeps the last N. The data
iterator goes through Grain's Orbax handler, which writes one JSON file per process
(`process_{i}-of-{n}.json`), so in a multi-host run every host resumes its own shard.
"""
from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp


class _IteratorForGrainHandler:
    """Adapts any iterator with JSON-able get_state()/set_state() to Grain's Orbax handler,
    which expects bytes for iterators that are not Grain's own."""

    def __init__(self, iterator):
        self._iterator = iterator

    def get_state(self) -> bytes:
        return json.dumps(self._iterator.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self._iterator.set_state(json.loads(state.decode()))

    def start_prefetch(self) -> None:  # called by Grain's handler after restoring
        pass


def make_manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
                                 item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator) -> None:
    args = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
        args["data"] = grain.checkpoint.CheckpointSave(_IteratorForGrainHandler(data_iterator))
    manager.save(step, args=ocp.args.Composite(**args), force=True)
    manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator):
    """Restores `step` into arrays laid out as `abstract_state` says (shape, dtype, sharding) and
    moves `data_iterator` to the saved position. Returns the state."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(_IteratorForGrainHandler(data_iterator))
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"]
