"""The optax optimizer from config: learning-rate schedule, AdamW, clipping, weight-decay mask.

`opt_cfg` is the config's `optimizer` section; every key is declared there and read as an
attribute. `total_steps` is the run length, used as the schedule length when
`optimizer.decay_steps` is 0.
"""
import functools

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


def _require(condition, field, requirement, value):
    if not condition:
        raise ValueError(f"optimizer.{field} must be {requirement}, got {value!r}")


def _schedule_length(opt_cfg, total_steps):
    """Steps from 0 to the end of the decay, warmup included (optax's `decay_steps` convention)."""
    return opt_cfg.decay_steps or total_steps


def _validate_schedule_fields(opt_cfg, total_steps):
    _require(opt_cfg.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}", opt_cfg.schedule)
    _require(opt_cfg.learning_rate > 0, "learning_rate", "> 0", opt_cfg.learning_rate)
    _require(opt_cfg.warmup_steps >= 0, "warmup_steps", ">= 0", opt_cfg.warmup_steps)
    _require(opt_cfg.decay_steps >= 0, "decay_steps", ">= 0", opt_cfg.decay_steps)
    _require(0 <= opt_cfg.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]", opt_cfg.min_lr_ratio)
    if opt_cfg.schedule == "constant":
        return
    # A decaying schedule needs at least one decay step after the warmup; fail here rather than
    # train silently at the peak rate.
    if opt_cfg.decay_steps:
        _require(
            opt_cfg.decay_steps > opt_cfg.warmup_steps,
            "decay_steps",
            f"> optimizer.warmup_steps ({opt_cfg.warmup_steps}) as it includes the warmup",
            opt_cfg.decay_steps,
        )
    else:
        _require(
            opt_cfg.warmup_steps < total_steps,
            "warmup_steps",
            f"< the run length total_steps={total_steps} (optimizer.decay_steps=0 decays over "
            "the whole run)",
            opt_cfg.warmup_steps,
        )


def _validate_update_fields(opt_cfg):
    _require(0 <= opt_cfg.b1 < 1, "b1", "in [0, 1)", opt_cfg.b1)
    _require(0 <= opt_cfg.b2 < 1, "b2", "in [0, 1)", opt_cfg.b2)
    _require(opt_cfg.eps >= 0, "eps", ">= 0", opt_cfg.eps)
    _require(opt_cfg.weight_decay >= 0, "weight_decay", ">= 0", opt_cfg.weight_decay)
    _require(opt_cfg.grad_clip_norm >= 0, "grad_clip_norm", ">= 0", opt_cfg.grad_clip_norm)
    _require(opt_cfg.skip_nonfinite_steps >= 0, "skip_nonfinite_steps", ">= 0", opt_cfg.skip_nonfinite_steps)


def validate(opt_cfg, total_steps):
    """Raises ValueError naming the first invalid `optimizer.*` field. Cheap: run it early."""
    _validate_schedule_fields(opt_cfg, total_steps)
    _validate_update_fields(opt_cfg)


def make_schedule(opt_cfg, total_steps):
    """Learning rate per step: linear warmup from 0 to the peak, then cosine / linear / constant.

    Cosine and linear reach `min_lr_ratio * learning_rate` at step `decay_steps` (warmup included;
    0 means `total_steps`) and stay there.
    """
    _validate_schedule_fields(opt_cfg, total_steps)
    peak = opt_cfg.learning_rate
    warmup_steps = opt_cfg.warmup_steps
    steps_after_warmup = _schedule_length(opt_cfg, total_steps) - warmup_steps
    if opt_cfg.schedule == "cosine":
        after_warmup = optax.cosine_decay_schedule(
            peak, steps_after_warmup, alpha=opt_cfg.min_lr_ratio
        )
    elif opt_cfg.schedule == "linear":
        after_warmup = optax.linear_schedule(
            peak, opt_cfg.min_lr_ratio * peak, steps_after_warmup
        )
    else:
        after_warmup = optax.constant_schedule(peak)
    if warmup_steps == 0:
        return after_warmup
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, after_warmup], [warmup_steps])


def weight_decay_mask(params, *, decay_embeddings, decay_norms_and_biases):
    """Pytree of bools like `params`: True where AdamW applies weight decay.

    Leaves are classified by name (the last key of their path): `kernel` (dense weights, an
    untied LM head included) always decays; `embedding` tables only if `decay_embeddings`;
    norm `scale`s and `bias`es only if `decay_norms_and_biases`. Any other leaf is left alone.
    `params` must be unboxed (plain nested dicts of arrays).
    """
    decayed_names = {"kernel"}
    if decay_embeddings:
        decayed_names.add("embedding")
    if decay_norms_and_biases:
        decayed_names.update({"scale", "bias"})

    def is_decayed(path, _):
        return jax.tree_util.keystr(path[-1:], simple=True) in decayed_names

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(opt_cfg, total_steps):
    """Returns (optax transformation, learning-rate schedule).

    Global-norm clipping (skipped when `grad_clip_norm` is 0) followed by AdamW with decoupled
    weight decay on the leaves `weight_decay_mask` picks, the whole wrapped in
    `optax.apply_if_finite` when `skip_nonfinite_steps` > 0 (its state counts the skipped steps; a
    skipped step does not advance the schedule's own count). The schedule is returned too so that
    the train loop can log the learning rate of each step.
    """
    validate(opt_cfg, total_steps)
    schedule = make_schedule(opt_cfg, total_steps)
    # A callable rather than a fixed tree: optax applies it to whatever it masks (params at init,
    # updates at each step), so the mask always matches the model's tree.
    decay_mask = functools.partial(
        weight_decay_mask,
        decay_embeddings=opt_cfg.decay_embeddings,
        decay_norms_and_biases=opt_cfg.decay_norms_and_biases,
    )
    adamw = optax.adamw(
        schedule,
        b1=opt_cfg.b1,
        b2=opt_cfg.b2,
        eps=opt_cfg.eps,
        weight_decay=opt_cfg.weight_decay,
        mask=decay_mask,
    )
    tx = adamw
    if opt_cfg.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip_norm), adamw)
    if opt_cfg.skip_nonfinite_steps > 0:
        tx = optax.apply_if_finite(tx, max_consecutive_errors=opt_cfg.skip_nonfinite_steps)
    return tx, schedule
