"""Schedules against values worked out by hand, the weight-decay mask, clipping, validation."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_jax import config_lib, optimizer


def make_cfg(**overrides):
    # The skeleton's optimizer block, so a key added there is present here too.
    cfg = config_lib.base_config().optimizer
    cfg.update(dict(learning_rate=2.0, schedule="cosine", warmup_steps=10, decay_steps=0, min_lr_ratio=0.1, b1=0.9,
                    b2=0.95, eps=1e-8, weight_decay=0.1, decay_embeddings=False, decay_norms_and_biases=False,
                    grad_clip_norm=1.0, grad_accum_steps=1))
    cfg.update(overrides)
    return cfg


# Peak 2.0, warmup 10 steps, schedule length 110 (decay_steps=0 -> total_steps), so the decay
# runs over steps 10..110 with its midpoint at 60; the floor is 0.1 * 2.0 = 0.2.
# Cosine midpoint: 0.2 + (2.0 - 0.2) * (1 + cos(pi / 2)) / 2 = 1.1; linear midpoint: the same.
@pytest.mark.parametrize(
    "name, expected",
    [
        ("cosine", {0: 0.0, 5: 1.0, 10: 2.0, 60: 1.1, 110: 0.2, 1000: 0.2}),
        ("linear", {0: 0.0, 5: 1.0, 10: 2.0, 35: 1.55, 60: 1.1, 110: 0.2, 1000: 0.2}),
        ("constant", {0: 0.0, 5: 1.0, 10: 2.0, 60: 2.0, 110: 2.0, 1000: 2.0}),
    ],
)
def test_schedule_values_by_hand(name, expected):
    schedule = optimizer.make_schedule(make_cfg(schedule=name), total_steps=110)
    jitted = jax.jit(schedule)
    for step, value in expected.items():
        np.testing.assert_allclose(schedule(step), value, rtol=1e-5, atol=1e-7, err_msg=f"{step=}")
        np.testing.assert_allclose(jitted(jnp.int32(step)), value, rtol=1e-5, atol=1e-7)


def test_cosine_quarter_point_by_hand():
    # A quarter through the decay: 0.2 + 1.8 * (1 + cos(pi / 4)) / 2.
    schedule = optimizer.make_schedule(make_cfg(), total_steps=110)
    np.testing.assert_allclose(schedule(35), 0.2 + 1.8 * (1 + np.cos(np.pi / 4)) / 2, rtol=1e-5)


def test_explicit_decay_steps_override_the_run_length():
    schedule = optimizer.make_schedule(make_cfg(decay_steps=60), total_steps=10_000)
    np.testing.assert_allclose(schedule(35), 1.1, rtol=1e-5)
    np.testing.assert_allclose(schedule(60), 0.2, rtol=1e-5)
    np.testing.assert_allclose(schedule(5000), 0.2, rtol=1e-5)


def test_no_warmup_starts_at_peak():
    schedule = optimizer.make_schedule(make_cfg(warmup_steps=0), total_steps=100)
    np.testing.assert_allclose(schedule(0), 2.0)
    np.testing.assert_allclose(schedule(50), 1.1, rtol=1e-5)


def realistic_params():
    return {
        "embed": {"embedding": jnp.full((7, 4), 3.0)},
        "block_0": {
            "attn": {"query": {"kernel": jnp.full((4, 4), 3.0), "bias": jnp.full((4,), 3.0)}},
            "norm": {"scale": jnp.full((4,), 3.0)},
        },
        "head": {"kernel": jnp.full((4, 7), 3.0)},
    }


def expected_mask(*, embedding, kernel, norms_and_biases):
    return {
        "embed": {"embedding": embedding},
        "block_0": {
            "attn": {"query": {"kernel": kernel, "bias": norms_and_biases}},
            "norm": {"scale": norms_and_biases},
        },
        "head": {"kernel": kernel},
    }


@pytest.mark.parametrize("decay_embeddings", [False, True])
@pytest.mark.parametrize("decay_norms_and_biases", [False, True])
def test_weight_decay_mask_picks_leaves_by_name(decay_embeddings, decay_norms_and_biases):
    mask = optimizer.weight_decay_mask(
        realistic_params(),
        decay_embeddings=decay_embeddings,
        decay_norms_and_biases=decay_norms_and_biases,
    )
    assert mask == expected_mask(
        embedding=decay_embeddings, kernel=True, norms_and_biases=decay_norms_and_biases
    )


@pytest.mark.parametrize("decay_embeddings", [False, True])
@pytest.mark.parametrize("decay_norms_and_biases", [False, True])
def test_weight_decay_applied_only_to_decayed_leaves(decay_embeddings, decay_norms_and_biases):
    # One step with zero gradients: Adam's part of the update is 0, so AdamW moves a decayed
    # leaf by -lr * weight_decay * value = -0.5 * 0.1 * 3.0, and leaves masked ones alone.
    cfg = make_cfg(
        learning_rate=0.5,
        schedule="constant",
        warmup_steps=0,
        weight_decay=0.1,
        decay_embeddings=decay_embeddings,
        decay_norms_and_biases=decay_norms_and_biases,
    )
    tx, _ = optimizer.make_optimizer(cfg, total_steps=100)
    params = realistic_params()
    updates, _ = jax.jit(tx.update)(
        jax.tree.map(jnp.zeros_like, params), tx.init(params), params
    )
    new_params = optax.apply_updates(params, updates)
    decayed = expected_mask(
        embedding=decay_embeddings, kernel=True, norms_and_biases=decay_norms_and_biases
    )
    expected = jax.tree.map(
        lambda is_decayed, value: value - 0.5 * 0.1 * value if is_decayed else value,
        decayed,
        params,
    )
    jax.tree.map(
        lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-6), new_params, expected
    )


def _first_update(grad_clip_norm, grads):
    # b1 = b2 = 0 and a large eps make Adam's update lr * g / (|g| + eps), proportional to the
    # (clipped) gradient, so the effect of clipping shows in the update's size.
    cfg = make_cfg(
        learning_rate=1.0,
        schedule="constant",
        warmup_steps=0,
        b1=0.0,
        b2=0.0,
        eps=1e3,
        weight_decay=0.0,
        grad_clip_norm=grad_clip_norm,
    )
    tx, _ = optimizer.make_optimizer(cfg, total_steps=100)
    params = jax.tree.map(jnp.zeros_like, grads)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_clipping_bounds_the_update():
    grads = {"dense": {"kernel": jnp.full((4, 4), 10.0)}}  # global norm 40
    clipped = _first_update(grad_clip_norm=1.0, grads=grads)
    # Clipped to norm 1, every entry is 0.25; the update is -0.25 / (0.25 + 1000) per entry.
    np.testing.assert_allclose(clipped["dense"]["kernel"], -0.25 / 1000.25, rtol=1e-5)
    assert optax.tree.norm(clipped) <= 1.0 * 1.0 / 1e3  # lr * clip / eps
    unclipped = _first_update(grad_clip_norm=0.0, grads=grads)
    np.testing.assert_allclose(unclipped["dense"]["kernel"], -10.0 / 1010.0, rtol=1e-5)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("learning_rate", 0.0, "optimizer.learning_rate must be > 0, got 0.0"),
        ("b1", 1.0, "optimizer.b1 must be in [0, 1), got 1.0"),
        ("b2", -0.5, "optimizer.b2 must be in [0, 1), got -0.5"),
        ("eps", -1.0, "optimizer.eps must be >= 0, got -1.0"),
        ("warmup_steps", -1, "optimizer.warmup_steps must be >= 0, got -1"),
        ("decay_steps", -1, "optimizer.decay_steps must be >= 0, got -1"),
        ("grad_clip_norm", -1.0, "optimizer.grad_clip_norm must be >= 0, got -1.0"),
        ("weight_decay", -0.1, "optimizer.weight_decay must be >= 0, got -0.1"),
        ("min_lr_ratio", 1.5, "optimizer.min_lr_ratio must be in [0, 1], got 1.5"),
        ("schedule", "step", "optimizer.schedule must be one of"),
    ],
)
def test_validation_names_the_field(field, value, message):
    cfg = make_cfg(**{field: value})
    with pytest.raises(ValueError, match=re.escape(message)):
        optimizer.make_optimizer(cfg, total_steps=100)


def test_unknown_schedule_rejected_by_make_schedule():
    with pytest.raises(ValueError, match=re.escape("optimizer.schedule")):
        optimizer.make_schedule(make_cfg(schedule="step"), total_steps=100)


def test_decay_must_outlast_warmup():
    with pytest.raises(ValueError, match=re.escape("optimizer.warmup_steps must be < the run")):
        optimizer.make_schedule(make_cfg(warmup_steps=100), total_steps=50)
    with pytest.raises(ValueError, match=re.escape("optimizer.decay_steps must be > optimizer")):
        optimizer.make_schedule(make_cfg(warmup_steps=100, decay_steps=50), total_steps=1000)
    # A constant schedule has nothing to decay, so a run shorter than its warmup is fine.
    schedule = optimizer.make_schedule(make_cfg(schedule="constant", warmup_steps=100), 50)
    np.testing.assert_allclose(schedule(50), 1.0)
