"""The transformer's invariants: causality, padding invariance, remat, presets, counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llm_jax import config_lib
from llm_jax.model import SIZES, Transformer, TransformerConfig, parameter_counts


def make_cfg(style="gpt2", kind="decoder", **overrides):
    config = config_lib.base_config()
    config.model.kind = kind
    config.model.style = style
    config.model.size = "nano"
    config.model.update(overrides)
    return TransformerConfig.from_config(config.model, vocab_size=259, seq_len=16)


def init(cfg, tokens):
    variables = Transformer(cfg).init(jax.random.PRNGKey(0), tokens)
    return nn.unbox(variables["params"])


def random_tokens(shape, seed=0, low=3, high=259):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, low, high)


@pytest.mark.parametrize("style,extra", [("gpt2", {}), ("llama", {"n_kv_heads": 1}),
                                         ("gpt2", {"attention_impl": "xla"})])
def test_decoder_is_causal(style, extra):
    """Changing a future token never changes the logits of earlier positions."""
    cfg = make_cfg(style, **extra)
    tokens = random_tokens((2, 16))
    params = init(cfg, tokens)
    logits = Transformer(cfg).apply({"params": params}, tokens)
    changed = tokens.at[:, 10].set((tokens[:, 10] + 1 - 3) % 256 + 3)
    logits_changed = Transformer(cfg).apply({"params": params}, changed)
    np.testing.assert_allclose(logits[:, :10], logits_changed[:, :10], atol=1e-5)
    assert not np.allclose(logits[:, 10:], logits_changed[:, 10:], atol=1e-3)


def test_encoder_is_bidirectional_and_padding_invariant():
    cfg = make_cfg("bert", kind="encoder")
    tokens = random_tokens((2, 16))
    mask = jnp.ones((2, 16), jnp.int32).at[:, 12:].set(0)
    params = init(cfg, tokens)
    apply = lambda t: Transformer(cfg).apply({"params": params}, t, mask_BxL=mask)
    logits = apply(tokens)
    # Whatever sits in the padding never changes the real positions' outputs ...
    padded_differently = tokens.at[:, 12:].set(7)
    np.testing.assert_allclose(logits[:, :12], apply(padded_differently)[:, :12], atol=1e-5)
    # ... while a real token later in the sequence does (no causal mask).
    changed = tokens.at[:, 11].set((tokens[:, 11] + 1 - 3) % 256 + 3)
    assert not np.allclose(logits[:, :11], apply(changed)[:, :11], atol=1e-4)


def test_bert_style_has_token_types_and_tied_mlm_head():
    cfg = make_cfg("bert", kind="encoder")
    params = init(cfg, random_tokens((1, 8)))
    assert cfg.type_vocab_size == 2 and "type_embed" in params and "mlm_bias" in params
    assert "lm_head" not in params
    tokens = random_tokens((1, 8))
    a = Transformer(cfg).apply({"params": params}, tokens, token_types_BxL=jnp.zeros_like(tokens))
    b = Transformer(cfg).apply({"params": params}, tokens, token_types_BxL=jnp.ones_like(tokens))
    assert not np.allclose(a, b)


def test_llama_style_uses_rope_rmsnorm_swiglu_gqa_untied():
    cfg = make_cfg("llama", n_kv_heads=1)
    params = init(cfg, random_tokens((1, 8)))
    assert (cfg.positions, cfg.norm, cfg.mlp, cfg.tie_embeddings) == ("rope", "rmsnorm", "swiglu", False)
    assert "position_embed" not in params and "lm_head" in params
    assert params["block_0"]["attn"]["key"]["kernel"].shape == (64, 1, 32)
    assert params["block_0"]["attn"]["query"]["kernel"].shape == (64, 2, 32)
    assert set(params["block_0"]["mlp"]) == {"gate", "up", "down"}
    assert "bias" not in params["final_norm"]


def test_einsum_and_xla_attention_agree():
    tokens = random_tokens((2, 16))
    cfg = make_cfg("llama", n_kv_heads=1)
    params = init(cfg, tokens)
    mask = jnp.ones((2, 16), jnp.int32).at[1, 9:].set(0)
    a = Transformer(cfg).apply({"params": params}, tokens, mask_BxL=mask)
    b = Transformer(make_cfg("llama", n_kv_heads=1, attention_impl="xla")).apply({"params": params}, tokens, mask_BxL=mask)
    np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_identical_loss_and_gradients(policy):
    tokens = random_tokens((2, 16))
    plain, remat = make_cfg(), make_cfg(remat=policy)
    params = init(plain, tokens)

    def loss(cfg, p):
        return jnp.mean(Transformer(cfg).apply({"params": p}, tokens) ** 2)

    g_plain = jax.grad(lambda p: loss(plain, p))(params)
    g_remat = jax.grad(lambda p: loss(remat, p))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_plain, g_remat)


def test_dropout_is_active_only_when_not_deterministic():
    cfg = make_cfg(dropout=0.5)
    tokens = random_tokens((1, 8))
    params = init(cfg, tokens)
    model = Transformer(cfg)
    a = model.apply({"params": params}, tokens, deterministic=True)
    b = model.apply({"params": params}, tokens, deterministic=True)
    c = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_bfloat16_compute_keeps_float32_params():
    cfg = make_cfg(dtype="bfloat16")
    tokens = random_tokens((1, 8))
    params = init(cfg, tokens)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert Transformer(cfg).apply({"params": params}, tokens).dtype == jnp.bfloat16


def test_parameters_carry_logical_axis_names():
    cfg = make_cfg("llama")
    boxed = Transformer(cfg).init(jax.random.PRNGKey(0), random_tokens((1, 8)))["params"]
    specs = nn.get_partition_spec(boxed)
    assert tuple(specs["token_embed"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["block_0"]["attn"]["query"]["kernel"]) == ("embed", "heads", "kv")
    assert tuple(specs["block_0"]["mlp"]["down"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")


def test_gpt2_size_has_gpt2_small_parameter_count():
    """With GPT-2's 50257-token vocabulary (unpadded) the "gpt2" row is GPT-2 small: 124,439,808."""
    config = config_lib.base_config()
    config.model.size, config.model.vocab_multiple = "gpt2", 1
    cfg = TransformerConfig.from_config(config.model, vocab_size=50257, seq_len=1024)
    shapes = jax.eval_shape(lambda: nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0),
                                                                   jnp.zeros((1, 8), jnp.int32))["params"]))
    counts = parameter_counts(shapes)
    assert counts["total"] == 124_439_808
    assert counts["embedding"] == 50257 * 768 + 1024 * 768


def test_nano_size_is_about_a_tenth_of_a_million_parameters():
    params = init(make_cfg(), random_tokens((1, 8)))
    assert 80_000 < parameter_counts(params)["non_embedding"] < 120_000


def test_config_presets_and_overrides():
    cfg = make_cfg("gpt2", d_model=96, n_heads=3)
    assert (cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff, cfg.n_layers) == (96, 3, 32, 384, SIZES["nano"]["n_layers"])
    assert cfg.vocab_size == 320  # 259 padded up to a multiple of 64
    assert make_cfg("gpt2", tie_embeddings=False).tie_embeddings is False


@pytest.mark.parametrize("overrides,field", [
    ({"d_model": 65}, "model.d_model"),
    ({"n_heads": 4, "n_kv_heads": 3}, "model.n_kv_heads"),
    ({"norm": "batchnorm"}, "model.norm"),
    ({"size": "huge"}, "model.size"),
    ({"attention_impl": "flash"}, "model.attention_impl"),
    ({"attention_block": -1}, "model.attention_block"),
    ({"vocab_size": 100}, "model.vocab_size"),
])
def test_invalid_model_fields_are_named(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make_cfg(**overrides)


@pytest.mark.parametrize("style,extra", [("gpt2", {}), ("llama", {"n_kv_heads": 1})])
def test_causal_query_blocks_match_one_block(style, extra):
    """Blocked causal attention (each query block scored only against the keys it may see) gives
    the unblocked logits and gradients for every real token, with padding and packed segments."""
    tokens = random_tokens((2, 16), seed=3)
    mask = jnp.ones((2, 16), jnp.int32).at[1, 13:].set(0)
    segment_ids = jnp.array([[1] * 7 + [2] * 9, [1] * 16])
    positions = jnp.array([list(range(7)) + list(range(9)), list(range(16))])
    blocked, whole = make_cfg(style, attention_block=4, **extra), make_cfg(style, attention_block=0, **extra)
    params = init(whole, tokens)

    def loss_and_logits(cfg, params):
        logits = Transformer(cfg).apply({"params": params}, tokens, mask_BxL=mask, segment_ids_BxL=segment_ids,
                                        positions_BxL=positions)
        return jnp.sum(jnp.where(mask[..., None] == 1, logits, 0.0) ** 2), logits

    (loss_b, logits_b), grads_b = jax.value_and_grad(loss_and_logits, argnums=1, has_aux=True)(blocked, params)
    (loss_w, logits_w), grads_w = jax.value_and_grad(loss_and_logits, argnums=1, has_aux=True)(whole, params)
    real = mask == 1
    np.testing.assert_allclose(np.asarray(logits_b)[real], np.asarray(logits_w)[real], atol=1e-5)
    np.testing.assert_allclose(loss_b, loss_w, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads_b, grads_w)


def test_vocab_size_sets_the_table_exactly():
    assert make_cfg(vocab_size=300).vocab_size == 300
    assert make_cfg().vocab_size == 320


def test_packed_examples_do_not_see_each_other():
    """Two examples packed in one row (segment ids, positions restarting) give the same logits
    as each example alone."""
    cfg = make_cfg("llama")
    first, second = random_tokens((1, 6), seed=1), random_tokens((1, 10), seed=2)
    params = init(cfg, first)
    model = Transformer(cfg)
    packed = jnp.concatenate([first, second], axis=1)
    segment_ids = jnp.array([[1] * 6 + [2] * 10])
    positions = jnp.array([list(range(6)) + list(range(10))])
    logits = model.apply({"params": params}, packed, segment_ids_BxL=segment_ids, positions_BxL=positions)
    np.testing.assert_allclose(logits[:, :6], model.apply({"params": params}, first), atol=1e-5)
    np.testing.assert_allclose(logits[:, 6:], model.apply({"params": params}, second), atol=1e-5)
