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
from absl import logging as absl_logging


class _DropItemMetadataWarning:
    """Reading one item's tree metadata (restore_params) makes Orbax warn that the step-level
    metadata file is not inside the item folder: true, expected, and noise."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("Metadata file does not exist")


absl_logging.get_absl_logger().addFilter(_DropItemMetadataWarning())


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


def latest_checkpoint_dir(path: str, *, field: str) -> str:
    """The newest complete step folder of a workdir (or `path` itself if it is a step folder).
    `field` names the config field that gave the path, for the error message."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "state")):
        return path
    checkpoints = os.path.join(path, "checkpoints")
    steps = sorted(int(name) for name in os.listdir(checkpoints) if name.isdigit()) \
        if os.path.isdir(checkpoints) else []
    if not steps:
        raise FileNotFoundError(f"{field}: no checkpoint in {path} (expected {checkpoints}/<step>/state)")
    return os.path.join(checkpoints, str(steps[-1]))


def restore_params(path: str, abstract_params, *, field: str = "train.init_from"):
    """Only the parameters of a checkpoint (a workdir's newest, or a step folder), laid out as
    `abstract_params` says (shape, dtype, sharding). Optimizer state, step and data position are
    left behind: this starts a new run from trained weights (SFT from a pretrained model, ...)."""
    state_dir = os.path.join(latest_checkpoint_dir(path, field=field), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    saved = checkpointer.metadata(state_dir).item_metadata.tree
    if "params" not in saved:
        raise ValueError(f"{field}: {state_dir} holds no 'params'")
    _check_same_structure(saved["params"], abstract_params, state_dir, field)
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), abstract_params)
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={"params": abstract_params}, restore_args={"params": restore_args}, partial_restore=True))
    return restored["params"]


def _check_same_structure(saved, expected, state_dir: str, field: str) -> None:
    """A checkpoint of another architecture fails with the first differing parameter named."""
    saved_leaves = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(saved)}
    for key, leaf in jax.tree_util.tree_leaves_with_path(expected):
        name = jax.tree_util.keystr(key)
        if name not in saved_leaves:
            raise ValueError(f"{field}: {state_dir} has no parameter {name}: another architecture?")
        if tuple(saved_leaves[name].shape) != tuple(leaf.shape):
            raise ValueError(f"{field}: parameter {name} has shape {tuple(saved_leaves[name].shape)} in "
                             f"{state_dir} but the model expects {tuple(leaf.shape)}")
