"""Crash consistency of checkpoints: manifests catch damaged files, a damaged newest checkpoint
is reported by name and set aside for the previous one, unfinished saves are cleaned up, and a
failed save leaves the earlier checkpoints intact."""
import errno
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import checkpoint, steps


class CountingIterator:
    """The smallest iterator the data item accepts: a position with JSON state."""

    def __init__(self):
        self.position = 0

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def make_state(scale: float):
    params = {"w": jnp.arange(4096, dtype=jnp.float32) * scale, "b": jnp.ones((3,)) * scale}
    return steps.TrainState(step=jnp.asarray(int(scale), jnp.int32), params=params, opt_state=(),
                            rng=jax.random.PRNGKey(0))


def abstract_of(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@pytest.fixture
def workdir_with_steps(tmp_path):
    """Checkpoints 1, 2, 3 (state scaled by the step, iterator at 10 x step); returns the workdir."""
    workdir = str(tmp_path / "run")
    manager = checkpoint.make_manager(workdir, keep=5)
    iterator = CountingIterator()
    for step in (1, 2, 3):
        iterator.position = 10 * step
        checkpoint.save(manager, step, make_state(step), iterator)
    manager.close()
    return workdir


def restore_newest(workdir):
    manager = checkpoint.make_manager(workdir, keep=5)
    iterator = CountingIterator()
    step, items = checkpoint.restore_latest(manager, abstract_of(make_state(1)), iterator)
    manager.close()
    return step, items, iterator


def largest_array_file(folder):
    files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(folder, "state"))
             for name in names if os.sep + "d" + os.sep in os.path.join(root, name)]
    return max(files, key=os.path.getsize)


def test_every_save_writes_a_manifest_that_verifies(workdir_with_steps):
    folder = os.path.join(workdir_with_steps, "checkpoints", "3")
    assert os.path.exists(os.path.join(folder, checkpoint.MANIFEST))
    checkpoint.verify(folder)
    step, items, iterator = restore_newest(workdir_with_steps)
    assert step == 3 and iterator.position == 30
    np.testing.assert_array_equal(items["state"].params["w"], np.arange(4096, dtype=np.float32) * 3)


def flip_a_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


DAMAGE = {
    "flipped byte": (flip_a_byte, "does not match its CRC-32"),  # Orbax alone restores this silently
    "truncated file": (lambda path: open(path, "r+b").truncate(10), "bytes, .* were written"),
    "deleted file": (os.remove, "is missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_named_set_aside_and_the_previous_used(workdir_with_steps, damage, caplog):
    damage_fn, reason = DAMAGE[damage]
    folder = os.path.join(workdir_with_steps, "checkpoints", "3")
    damaged_file = largest_array_file(folder)
    damage_fn(damaged_file)
    with pytest.raises(checkpoint.CorruptCheckpoint, match=reason):
        checkpoint.verify(folder)

    step, items, iterator = restore_newest(workdir_with_steps)
    assert step == 2 and iterator.position == 20
    np.testing.assert_array_equal(items["state"].params["b"], np.full(3, 2.0, np.float32))
    assert f"checkpoint {folder} is unusable" in caplog.text and os.path.basename(damaged_file) in caplog.text
    assert sorted(os.listdir(os.path.dirname(folder))) == ["1", "2", "3.corrupt"]  # kept for inspection


def test_checkpoint_without_manifest_is_judged_by_its_restore(workdir_with_steps):
    """A kill between Orbax's rename and the manifest leaves a complete checkpoint: it is used.
    If its arrays are unreadable, the restore fails and it is set aside all the same."""
    folder = os.path.join(workdir_with_steps, "checkpoints", "3")
    os.remove(os.path.join(folder, checkpoint.MANIFEST))
    assert restore_newest(workdir_with_steps)[0] == 3
    os.remove(largest_array_file(folder))
    assert restore_newest(workdir_with_steps)[0] == 2


def test_no_usable_checkpoint_starts_over_with_the_iterator_at_the_start(workdir_with_steps):
    for step in ("1", "2", "3"):
        open(os.path.join(workdir_with_steps, "checkpoints", step, checkpoint.MANIFEST), "w").write("{")
    step, items, iterator = restore_newest(workdir_with_steps)
    assert (step, items, iterator.position) == (None, None, 0)


def test_unfinished_save_is_reported_and_removed(workdir_with_steps, caplog):
    directory = os.path.join(workdir_with_steps, "checkpoints")
    unfinished = os.path.join(directory, "4.orbax-checkpoint-tmp-1234567")
    os.makedirs(os.path.join(unfinished, "state"))
    assert restore_newest(workdir_with_steps)[0] == 3
    assert f"checkpoint {unfinished} is a save that did not finish" in caplog.text
    assert not os.path.exists(unfinished)


def test_checkpoint_of_another_shape_is_an_error_not_damage(workdir_with_steps):
    manager = checkpoint.make_manager(workdir_with_steps, keep=5)
    other = make_state(1).replace(params={"w": jnp.zeros((8,)), "b": jnp.zeros((3,))})
    with pytest.raises(ValueError, match=r"parameter \['w'\] has shape \(4096,\)"):
        checkpoint.restore_latest(manager, abstract_of(other), CountingIterator())
    assert "3" in os.listdir(os.path.join(workdir_with_steps, "checkpoints"))  # not set aside


def test_failed_save_names_the_intact_checkpoint_and_leaves_no_partial_step(workdir_with_steps, monkeypatch):
    def disk_full(folder, step):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_manifest", disk_full)
    manager = checkpoint.make_manager(workdir_with_steps, keep=5)
    with pytest.raises(checkpoint.CheckpointSaveError,
                       match=r"saving checkpoint 4 .* failed \(.*No space left on device\); checkpoint 3 is intact"):
        checkpoint.save(manager, 4, make_state(4), CountingIterator())
    manager.close()
    assert sorted(os.listdir(os.path.join(workdir_with_steps, "checkpoints"))) == ["1", "2", "3"]
    assert restore_newest(workdir_with_steps)[0] == 3
