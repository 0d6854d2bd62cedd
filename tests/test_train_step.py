"""Train steps: sharded == single device, gradient accumulation == one big batch, golden values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import sharding, train


def run_steps(config, devices, batches):
    exp = train.build_experiment(config, devices=devices)
    _, shardings, init = train.state_shardings_and_init(exp, config.seed)
    train_step, eval_step, batch_sharding = train.compile_steps(exp, shardings)
    losses = []
    with sharding.mesh_context(exp.mesh):
        state = init()
        for batch in batches:
            state, metrics = train_step(state, sharding.shard_host_batch(batch, batch_sharding))
            losses.append(float(metrics["train/loss"]))
        eval_sums = jax.device_get(eval_step(state.params, sharding.shard_host_batch(batches[0], batch_sharding)))
    return losses, jax.device_get(state.params), eval_sums


def random_batches(config, n, seed=0):
    rng = np.random.default_rng(seed)
    shape = (config.data.batch_size, config.data.seq_len)
    mask = np.ones(shape, np.int32)
    mask[0, -5:] = 0  # some padding, so masking is exercised too
    return [{"tokens": rng.integers(3, 259, shape, dtype=np.int32), "mask": mask} for _ in range(n)]


FSDP_TENSOR = dict(data=1, fsdp=4, tensor=2)


@pytest.mark.parametrize("style,task,kind,mesh", [
    ("gpt2", "lm", "decoder", FSDP_TENSOR),
    ("gpt2", "lm", "decoder", dict(data=2, fsdp=2, tensor=2)),
    ("llama", "lm", "decoder", FSDP_TENSOR),
    ("bert", "mlm", "encoder", FSDP_TENSOR),
])
def test_sharded_run_equals_single_device(tiny_config, style, task, kind, mesh):
    config = tiny_config(**{"model.style": style, "task": task, "model.kind": kind, "model.n_heads": 4,
                            "model.n_kv_heads": 2 if style == "llama" else 0})
    batches = random_batches(config, 3)
    single = run_steps(config, jax.devices()[:1], batches)
    config.mesh.update(mesh)
    sharded = run_steps(config, jax.devices(), batches)
    assert len(jax.devices()) == 8
    np.testing.assert_allclose(single[0], sharded[0], rtol=2e-5)
    # atol: the key bias has a mathematically zero gradient (softmax ignores a per-query
    # constant), so Adam turns its round-off into updates of ~1e-5 that differ by reduction order.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5), single[1], sharded[1])
    np.testing.assert_allclose(single[2]["loss_sum"], sharded[2]["loss_sum"], rtol=2e-5)


def test_parameters_are_really_sharded(tiny_config):
    config = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
    exp = train.build_experiment(config)
    _, shardings, init = train.state_shardings_and_init(exp, 0)
    with sharding.mesh_context(exp.mesh):
        state = init()
    kernel = state.params["block_0"]["mlp"]["up"]["kernel"]  # (embed, mlp) -> (fsdp, tensor)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (64 // 4, 256 // 2)
    mu = state.opt_state[1][0].mu["block_0"]["mlp"]["up"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec


def test_gradient_accumulation_equals_one_big_batch(tiny_config):
    config = tiny_config()
    batches = random_batches(config, 2)
    whole = run_steps(config, jax.devices()[:1], batches)
    config.optimizer.grad_accum_steps = 4
    accumulated = run_steps(config, jax.devices()[:1], batches)
    np.testing.assert_allclose(whole[0], accumulated[0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5), whole[1], accumulated[1])


# Golden values of the nano GPT-2 decoder over three steps on a fixed batch (the first step's
# learning rate is 0: warmup starts there, so the first two losses are equal). If a change
# alters the numerics ON PURPOSE (init, loss, optimizer), rerun this test with
# UPDATE_GOLDEN=1 printed values and paste them here, saying why in the commit message.
GOLDEN_LOSSES = [5.789659023284912, 5.789659023284912, 5.30980920791626]
GOLDEN_PARAM_SUM = 2359.6142578125


def test_golden_one_step(tiny_config):
    config = tiny_config()
    tokens = (np.arange(8 * 32).reshape(8, 32) * 7919 % 256 + 3).astype(np.int32)
    batch = {"tokens": tokens, "mask": np.ones_like(tokens)}
    losses, params, _ = run_steps(config, jax.devices()[:1], [batch] * 3)
    param_sum = float(sum(jnp.sum(jnp.abs(p)) for p in jax.tree.leaves(params)))
    message = f"golden values changed: losses={losses!r}, param abs sum={param_sum!r} (see comment above)"
    np.testing.assert_allclose(losses, GOLDEN_LOSSES, rtol=1e-5, err_msg=message)
    np.testing.assert_allclose(param_sum, GOLDEN_PARAM_SUM, rtol=1e-5, err_msg=message)


def test_sft_prompt_tokens_carry_no_gradient():
    """Only logits that predict response tokens (and EOS) get gradient; prompt predictions none."""
    from llm_jax import objectives, steps

    tokens = jnp.array([[10, 11, 12, 13, 20, 21, 1, 0]])
    batch = {"tokens": tokens, "mask": jnp.array([[1] * 7 + [0]]),
             "loss_mask": jnp.array([[0, 0, 0, 0, 1, 1, 1, 0]])}  # response 20 21, then EOS
    inputs, targets, weights = steps.sft_task(batch, None, None)
    np.testing.assert_array_equal(weights, [[0, 0, 0, 1, 1, 1, 0, 0]])  # logits at t predict t + 1
    logits = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 32))
    grads = jax.grad(lambda l: objectives.cross_entropy_sums(l, targets, weights)["loss_sum"])(logits)
    row_norms = np.abs(np.asarray(grads)).sum(-1)[0]
    assert np.all(row_norms[[0, 1, 2, 6, 7]] == 0) and np.all(row_norms[[3, 4, 5]] > 0)
