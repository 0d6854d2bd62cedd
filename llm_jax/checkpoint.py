"""Checkpoints: the train state and each process' data-iterator position, saved together, and
checked before they are trusted.

Orbax's CheckpointManager writes each step into a temporary folder and renames it when complete,
so a crash mid-save leaves `<step>.orbax-checkpoint-tmp-*` behind rather than a half-written step;
such leftovers are reported and removed when the workdir is opened again. It keeps the last N.
The data iterator goes through Grain's Orbax handler, which writes one JSON file per process
(`process_{i}-of-{n}.json`), so in a multi-host run every host resumes its own shard.

Orbax stores no checksums: a truncated or missing array file fails at restore, but a flipped byte
restores silently. So after each save the primary process writes `MANIFEST` into the step folder
(size and CRC-32 of every file), and a resume checks it: a newest checkpoint that fails the check
or fails to restore is reported by name, moved aside to `<step>.corrupt` (kept for inspection,
out of Orbax's sight) and the previous one is used.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import zlib

import grain
import jax
import numpy as np
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


MANIFEST = "llm_jax_manifest.json"  # in each step folder: {"step": N, "files": {path: [size, crc32]}}
CORRUPT_SUFFIX = ".corrupt"
_UNFINISHED_MARKER = ".orbax-checkpoint-tmp"


class CheckpointSaveError(RuntimeError):
    """A save failed (full disk, permissions, ...); the checkpoints saved before it are intact."""


class CorruptCheckpoint(ValueError):
    """A step folder whose files do not match its manifest, or that Orbax cannot restore."""


def checkpoints_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, *, keep: int, items: tuple[str, ...] = ("state", "data")) -> ocp.CheckpointManager:
    """The workdir's checkpoint manager. Saves that never finished (the process was killed while
    writing them) are reported by name here and removed by Orbax (`cleanup_tmp_directories`)."""
    directory = checkpoints_dir(workdir)
    if os.path.isdir(directory) and jax.process_index() == 0:
        for name in sorted(os.listdir(directory)):
            if _UNFINISHED_MARKER in name:
                _warn(f"checkpoint {os.path.join(directory, name)} is a save that did not finish "
                      f"(the run stopped while writing it); removing it")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory, options=options, item_names=items)


def _warn(message: str) -> None:
    absl_logging.warning(message)  # on stderr at main's default verbosity, and in --log_dir files


def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, *, extra_args=None) -> None:
    """Saves `state` and the data position as `step`, then its manifest. `extra_args`: more
    Orbax items ({name: ocp.args.JsonSave(...) or StandardSave(...)}), named in `make_manager`'s
    `items`. A failure leaves the previous checkpoints untouched and says so."""
    args = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
        args["data"] = grain.checkpoint.CheckpointSave(_IteratorForGrainHandler(data_iterator))
    args.update(extra_args or {})
    try:
        manager.save(step, args=ocp.args.Composite(**args), force=True)
        manager.wait_until_finished()
        if jax.process_index() == 0:
            write_manifest(step_dir(manager, step), step)
    except Exception as error:  # a full disk surfaces as OSError or as a TensorStore error
        _remove_unfinished(manager, step)
        previous = [s for s in manager.all_steps() if s != step]
        kept = f"checkpoint {max(previous)} is intact" if previous else "no earlier checkpoint exists"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointSaveError(f"saving checkpoint {step} into {manager.directory} failed ({reason}); "
                                  f"{kept} and a rerun resumes from it") from error
    if jax.process_count() > 1:  # nobody reads the step before its manifest exists
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"llm_jax checkpoint {step} manifest")


def _remove_unfinished(manager, step: int) -> None:
    """After a failed save: its temporary folder, and the step folder if it has no manifest (the
    save may have failed after Orbax's rename), so the space is freed and nothing half-written
    is mistaken for a checkpoint."""
    if jax.process_index() != 0:
        return
    directory = str(manager.directory)
    for name in os.listdir(directory):
        if name.startswith(f"{step}.") and _UNFINISHED_MARKER in name:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    folder = step_dir(manager, step)
    if os.path.isdir(folder) and not os.path.exists(os.path.join(folder, MANIFEST)):
        shutil.rmtree(folder, ignore_errors=True)
    manager.reload()


def _file_digest(path: str) -> tuple[int, int]:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return os.path.getsize(path), crc


def _files(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names if name != MANIFEST)


def write_manifest(folder: str, step: int) -> None:
    """Size and CRC-32 of every file of a finished step folder, written atomically (temp + rename)."""
    files = {name: list(_file_digest(os.path.join(folder, name))) for name in _files(folder)}
    manifest = {"step": step, "files": files}
    temporary = os.path.join(folder, MANIFEST + ".tmp")
    with open(temporary, "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(folder, MANIFEST))


def verify(folder: str) -> None:
    """Raises CorruptCheckpoint naming the first file that is missing, resized or changed. A folder
    without a manifest (written before manifests existed, or the process died between Orbax's
    rename and the manifest) is left to the restore itself to judge."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as error:
        raise CorruptCheckpoint(f"{path} is unreadable ({error})") from error
    for name, (size, crc) in files.items():
        file = os.path.join(folder, name)
        if not os.path.exists(file):
            raise CorruptCheckpoint(f"{file} is missing")
        actual_size, actual_crc = _file_digest(file)
        if actual_size != size:
            raise CorruptCheckpoint(f"{file} has {actual_size} bytes, {size} were written")
        if actual_crc != crc:
            raise CorruptCheckpoint(f"{file} does not match its CRC-32: the bytes changed after the save")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator):
    """Restores `step` into arrays laid out as `abstract_state` says (shape, dtype, sharding) and
    moves `data_iterator` to the saved position. Returns the state."""
    return restore_items(manager, step, abstract_state, data_iterator)["state"]


def restore_items(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator, *, extra_args=None):
    """As `restore`, plus the items `extra_args` asks for ({name: ocp.args.JsonRestore() or
    StandardRestore(abstract)}); returns {"state": state, name: item, ...}."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(_IteratorForGrainHandler(data_iterator))
    args.update(extra_args or {})
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    return {name: restored[name] for name in ("state", *(extra_args or {}))}


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iterator, *, extra_args=None):
    """(step, items) of the newest checkpoint that passes `verify` and restores (items as
    `restore_items` returns them, without the extra items that step lacks); (None, None) when
    there is none. Each newer one that fails is
    reported by name and moved to `<step>.corrupt`, so the run continues from the previous one and
    never saves over it. A checkpoint whose parameters have other shapes raises instead."""
    # A failed restore may have moved the iterator already: with no usable checkpoint it starts over.
    initial_position = data_iterator.get_state() if data_iterator is not None else None
    for step in sorted(manager.all_steps(), reverse=True):
        folder = step_dir(manager, step)
        try:
            verify(folder)
            saved = ocp.PyTreeCheckpointer().metadata(os.path.join(folder, "state")).item_metadata.tree
        except Exception as caught:  # Orbax raises many types for damaged files
            saved, error = None, caught
        if saved is not None:
            # A checkpoint of another model (a changed tokenizer, say) is not damage: stop with the
            # differing parameter named rather than set it aside and start over.
            _check_same_structure(saved["params"], abstract_state.params, folder, "resume")
            # Items a step lacks (written before they existed, or not needed then) are not asked for.
            present = {name: args for name, args in (extra_args or {}).items()
                       if os.path.isdir(os.path.join(folder, name))}
            try:
                restored = restore_items(manager, step, abstract_state, data_iterator, extra_args=present)
                error = None
            except Exception as caught:  # TensorStore: truncated or missing array files
                error = caught
        if _all_processes_ok(error is None):
            return step, restored
        reason = str(error).strip().splitlines()[0] if error is not None else "another process could not read it"
        _set_aside(manager, folder, reason)
    if data_iterator is not None:
        data_iterator.set_state(initial_position)
    return None, None


def _all_processes_ok(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _set_aside(manager, folder: str, reason: str) -> None:
    target = folder + CORRUPT_SUFFIX
    if jax.process_index() == 0:
        if os.path.exists(target):
            target = f"{target}.{int(time.time())}"
        _warn(f"checkpoint {folder} is unusable ({reason}); moved to {target}, resuming from the one before")
        os.replace(folder, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"llm_jax set aside {folder}")
    manager.reload()


def latest_checkpoint_dir(path: str, *, field: str) -> str:
    """The newest complete step folder of a workdir (or `path` itself if it is a step folder).
    `field` names the config field that gave the path, for the error message. A newest folder
    that fails `verify` is reported and passed over (not moved: the workdir may be another run's)."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "state")):
        verify(path)
        return path
    checkpoints = os.path.join(path, "checkpoints")
    steps = sorted((int(name) for name in os.listdir(checkpoints) if name.isdigit()), reverse=True) \
        if os.path.isdir(checkpoints) else []
    for step in steps:
        folder = os.path.join(checkpoints, str(step))
        try:
            verify(folder)
        except CorruptCheckpoint as error:
            _warn(f"{field}: checkpoint {folder} is unusable ({error}); using the one before")
            continue
        return folder
    usable = "usable " if steps else ""
    raise FileNotFoundError(f"{field}: no {usable}checkpoint in {path} (expected {checkpoints}/<step>/state)")


VOCABULARY_FILE = "vocabulary.json"  # in a workdir: the tokenizer fingerprint its run trained with


def write_vocabulary(workdir: str, vocabulary: dict) -> None:
    os.makedirs(workdir, exist_ok=True)
    temporary = os.path.join(workdir, VOCABULARY_FILE + ".tmp")
    with open(temporary, "w") as f:
        json.dump(vocabulary, f, indent=2, sort_keys=True)
    os.replace(temporary, os.path.join(workdir, VOCABULARY_FILE))


def check_vocabulary(path: str, vocabulary: dict, *, field: str) -> None:
    """Refuses a run (a workdir, or a step folder of one) recorded with another vocabulary than
    `vocabulary` (`tokenizer.fingerprint`). Runs from before the record pass unchecked."""
    path = os.path.abspath(path)
    workdir = os.path.dirname(os.path.dirname(path)) if os.path.isdir(os.path.join(path, "state")) else path
    record = os.path.join(workdir, VOCABULARY_FILE)
    if not os.path.exists(record):
        return
    with open(record) as f:
        recorded = json.load(f)
    differs = [f"{key} {recorded.get(key)!r} there, {value!r} now" for key, value in vocabulary.items()
               if recorded.get(key) != value]
    if differs:
        raise ValueError(f"{field}: {workdir} was trained with another vocabulary ({'; '.join(differs)}); its "
                         f"embeddings would be read as other tokens: use its tokenizer (data.tokenizer, "
                         f"data.tokenizer_path)")


def restore_params(path: str, abstract_params, *, field: str = "train.init_from", optional: tuple[str, ...] = ()):
    """Only the parameters of a checkpoint (a workdir's newest, or a step folder), laid out as
    `abstract_params` says (shape, dtype, sharding). Optimizer state, step and data position are
    left behind: this starts a new run from trained weights (SFT from a pretrained model, ...).
    `optional`: top-level modules (heads) the checkpoint may lack; then they are not returned."""
    state_dir = os.path.join(latest_checkpoint_dir(path, field=field), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    saved = checkpointer.metadata(state_dir).item_metadata.tree
    if "params" not in saved:
        raise ValueError(f"{field}: {state_dir} holds no 'params'")
    abstract_params = {name: value for name, value in abstract_params.items()
                       if name in saved["params"] or name not in optional}
    _check_same_structure(saved["params"], abstract_params, state_dir, field)
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), abstract_params)
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={"params": abstract_params}, restore_args={"params": restore_args}, partial_restore=True))
    return restored["params"]


def _check_same_structure(saved, expected, state_dir: str, field: str) -> None:
    """A checkpoint of another architecture fails with the differing parameter named; one whose
    parameters differ only in the vocabulary's size says that the tokenizer does not match. Orbax
    itself refuses another shape without naming the parameter, and a parameter the model lacks
    (an extra layer) would be dropped without a word by a partial restore."""
    # Parameters with a vocabulary dimension: when only these differ, the tokenizer changed.
    vocabulary_params = ("['token_embed']", "['lm_head']", "['mlm_bias']")
    # Heads a checkpoint may hold that the model does not (a reward model started from a language
    # model drops its untied lm_head; one started from a reward model drops reward_head).
    droppable_heads = ("['lm_head']", "['reward_head']", "['mlm_transform']", "['mlm_norm']", "['mlm_bias']")

    def module(name: str) -> str:
        return name.split("]")[0] + "]"

    saved_leaves = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(saved)}
    expected_leaves = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    missing = [name for name in expected_leaves if name not in saved_leaves]
    if missing:
        raise ValueError(f"{field}: {state_dir} has no parameter {missing[0]} ({len(missing)} missing): a checkpoint "
                         f"of another architecture (model.* differs)")
    modules = {module(name) for name in expected_leaves}
    extra = [name for name in saved_leaves if name not in expected_leaves
             and (module(name) in modules or module(name) not in droppable_heads)]
    if extra:
        raise ValueError(f"{field}: {state_dir} has parameter {extra[0]}, which the model lacks ({len(extra)} "
                         f"such): a checkpoint of another architecture (model.* differs)")
    differ = [(name, tuple(saved_leaves[name].shape), tuple(leaf.shape)) for name, leaf in expected_leaves.items()
              if tuple(saved_leaves[name].shape) != tuple(leaf.shape)]
    if not differ:
        return
    architecture = [d for d in differ if module(d[0]) not in vocabulary_params]
    if not architecture:
        name, was, now = differ[0]
        raise ValueError(f"{field}: the vocabulary differs: parameter {name} has shape {was} in {state_dir} but the "
                         f"model expects {now}; the tokenizer (data.tokenizer, data.tokenizer_path) or "
                         f"model.vocab_size does not match the checkpoint's")
    name, was, now = architecture[0]
    raise ValueError(f"{field}: parameter {name} has shape {was} in {state_dir} but the model expects {now}: a "
                     f"checkpoint of another architecture (model.* differs)")
