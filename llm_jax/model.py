"""The one transformer of llm_jax: a causal decoder (GPT-2 / LLaMA style) or a bidirectional
encoder (BERT), chosen by `TransformerConfig`.

Every parameter carries logical axis names (see sharding.LOGICAL_RULES) and every large
activation a logical sharding constraint, so the same module runs on one CPU or sharded over a
("data", "fsdp", "tensor") mesh. Names carry their shapes: B batch, L length (queries), S length
(keys), D d_model, H query heads, K key/value heads, G query heads per K head, E head dim,
F d_ff, V vocab.

Decoding (`decode=True`, decoders only) keeps a key/value cache in the "cache" collection: see
`init_cache` and llm_jax/sampling.py, which drives it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

# Model shapes by name, so that a scaling ladder is a list of names. Non-embedding parameter
# counts (GPT-2 style) are in the comments; "gpt2" is GPT-2 small (124M with its 50257 vocab).
SIZES: dict[str, dict[str, int]] = {
    "nano": dict(d_model=64, n_layers=2, n_heads=2),  # ~0.1M
    "micro": dict(d_model=96, n_layers=3, n_heads=3),  # ~0.33M
    "tiny": dict(d_model=128, n_layers=4, n_heads=4),  # ~0.8M
    "mini": dict(d_model=256, n_layers=4, n_heads=4),  # ~3.2M
    "small": dict(d_model=384, n_layers=6, n_heads=6),  # ~10.6M
    "medium": dict(d_model=512, n_layers=8, n_heads=8),  # ~25M
    "gpt2": dict(d_model=768, n_layers=12, n_heads=12),  # ~85M (+38.6M embeddings = 124M)
    "gpt2-medium": dict(d_model=1024, n_layers=24, n_heads=16),  # ~302M
}

# Architectural defaults of each style; any field left unset in the config takes these.
STYLES: dict[str, dict[str, Any]] = {
    "gpt2": dict(norm="layernorm", mlp="gelu", positions="learned", tie_embeddings=True,
                 use_bias=True, norm_position="pre", embed_norm=False, type_vocab_size=0,
                 mlm_head_transform=False, norm_eps=1e-5),
    "llama": dict(norm="rmsnorm", mlp="swiglu", positions="rope", tie_embeddings=False,
                  use_bias=False, norm_position="pre", embed_norm=False, type_vocab_size=0,
                  mlm_head_transform=False, norm_eps=1e-5),
    "bert": dict(norm="layernorm", mlp="gelu", positions="learned", tie_embeddings=True,
                 use_bias=True, norm_position="post", embed_norm=True, type_vocab_size=2,
                 mlm_head_transform=True, norm_eps=1e-12),
}

_CHOICES = {
    "kind": ("decoder", "encoder", "word2vec"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu"),
    "positions": ("learned", "rope"),
    "norm_position": ("pre", "post"),
    "attention_impl": ("einsum", "xla", "cudnn"),
    "remat": ("none", "full", "dots"),
    "dtype": ("float32", "bfloat16", "float16"),
    "param_dtype": ("float32", "bfloat16"),
    "head": ("lm", "scalar"),
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Fully resolved architecture. Hashable, so a module built from it can be a jit static."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_len: int
    kind: str = "decoder"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    gelu_approximate: bool = False  # GELU's tanh approximation (GPT-2's "gelu_new") instead of erf
    positions: str = "learned"
    rope_theta: float = 10_000.0
    tie_embeddings: bool = True
    use_bias: bool = True
    norm_position: str = "pre"
    embed_norm: bool = False
    type_vocab_size: int = 0
    mlm_head_transform: bool = False
    head: str = "lm"  # 'lm': logits over the vocabulary; 'scalar': one reward per sequence
    dropout: float = 0.0
    attention_impl: str = "einsum"
    attention_block: int = 0  # einsum attention of decoders: causal query blocks (0 = one block)
    remat: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for field, allowed in _CHOICES.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"model.{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads ({self.n_heads}) must be a multiple of "
                             f"model.n_kv_heads ({self.n_kv_heads})")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.attention_block < 0:
            raise ValueError(f"model.attention_block must be >= 0 (0 = no query blocks), got {self.attention_block}")

    @property
    def causal(self) -> bool:
        return self.kind == "decoder"

    @classmethod
    def from_config(cls, model_cfg, vocab_size: int, seq_len: int, head: str = "lm") -> "TransformerConfig":
        """Resolves a `config.model` ConfigDict: size and style presets fill unset fields.

        `vocab_size` is the tokenizer's; it is padded up to `model.vocab_multiple` so the
        embedding shards evenly and matmuls get friendly shapes (nanoGPT's 50304), unless
        `model.vocab_size` sets the table's size exactly (a checkpoint's, or a benchmark's).
        """
        if model_cfg.size not in SIZES:
            raise ValueError(f"model.size must be one of {sorted(SIZES)}, got {model_cfg.size!r}")
        if model_cfg.style not in STYLES:
            raise ValueError(f"model.style must be one of {sorted(STYLES)}, got {model_cfg.style!r}")
        size, style = SIZES[model_cfg.size], STYLES[model_cfg.style]

        def pick(name, default):
            value = model_cfg[name]
            unset = value is None or (not isinstance(value, bool) and value in (0, ""))
            return default if unset else value

        d_model = pick("d_model", size["d_model"])
        n_heads = pick("n_heads", size["n_heads"])
        if d_model % n_heads and not model_cfg.head_dim and model_cfg.kind != "word2vec":  # word2vec: no heads
            raise ValueError(f"model.d_model ({d_model}) must be divisible by model.n_heads ({n_heads})")
        mlp = pick("mlp", style["mlp"])
        # SwiGLU has three matrices; LLaMA's 8/3 * d keeps its parameter count equal to GELU's 4d.
        default_ff = 4 * d_model if mlp == "gelu" else _round_up(int(8 * d_model / 3), 32)
        multiple = model_cfg.vocab_multiple
        if multiple < 1:
            raise ValueError(f"model.vocab_multiple must be >= 1, got {multiple}")
        table_size = model_cfg.get("vocab_size", 0) or _round_up(vocab_size, multiple)
        if table_size < vocab_size:
            raise ValueError(f"model.vocab_size ({table_size}) is smaller than the tokenizer's vocabulary "
                             f"({vocab_size})")
        return cls(
            vocab_size=table_size,
            d_model=d_model,
            # word2vec (word2vec.py): two tables of d_model-wide vectors and no layers, so that
            # parameter and FLOP counts come out right.
            n_layers=0 if model_cfg.kind == "word2vec" else pick("n_layers", size["n_layers"]),
            n_heads=n_heads,
            n_kv_heads=pick("n_kv_heads", n_heads),
            head_dim=pick("head_dim", d_model // n_heads),
            d_ff=pick("d_ff", default_ff),
            max_len=pick("max_len", seq_len),
            kind=model_cfg.kind,
            norm=pick("norm", style["norm"]),
            norm_eps=pick("norm_eps", style["norm_eps"]),
            mlp=mlp,
            gelu_approximate=model_cfg.gelu_approximate,
            positions=pick("positions", style["positions"]),
            rope_theta=model_cfg.rope_theta,
            tie_embeddings=model_cfg.kind != "word2vec" and pick("tie_embeddings", style["tie_embeddings"]),
            use_bias=pick("use_bias", style["use_bias"]),
            norm_position=pick("norm_position", style["norm_position"]),
            embed_norm=pick("embed_norm", style["embed_norm"]),
            # -1 means the style's default; decoders never have token types.
            type_vocab_size=(0 if model_cfg.kind == "decoder" else style["type_vocab_size"]
                             if model_cfg.type_vocab_size < 0 else model_cfg.type_vocab_size),
            mlm_head_transform=pick("mlm_head_transform", style["mlm_head_transform"]),
            dropout=model_cfg.dropout,
            attention_impl=model_cfg.attention_impl,
            attention_block=model_cfg.get("attention_block", 0),
            remat=model_cfg.remat,
            dtype=model_cfg.dtype,
            param_dtype=model_cfg.param_dtype,
            head=head,
        )


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------

def _dense_init(std: float):
    return nn.initializers.normal(stddev=std)


def _partitioned(init, names):
    return nn.with_logical_partitioning(init, names)


class Norm(nn.Module):
    """LayerNorm (GPT-2, BERT) or RMSNorm (LLaMA), statistics in float32."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x_BxLxD):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        x = x_BxLxD.astype(jnp.float32)
        if cfg.norm == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + cfg.norm_eps)
        scale = self.param("scale", _partitioned(nn.initializers.ones, ("embed",)),
                           (cfg.d_model,), jnp.dtype(cfg.param_dtype))
        x = x * scale.astype(jnp.float32)
        if cfg.norm == "layernorm":
            bias = self.param("bias", _partitioned(nn.initializers.zeros, ("embed",)),
                              (cfg.d_model,), jnp.dtype(cfg.param_dtype))
            x = x + bias.astype(jnp.float32)
        return x.astype(dtype)


def rotary_embedding(x_BxLxNxE, positions_BxL, theta: float):
    """RoPE with the half-split ("rotate_half") layout used by LLaMA checkpoints in HF format."""
    half = x_BxLxNxE.shape[-1] // 2
    inv_freq_E2 = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles_BxLx1xE2 = (positions_BxL[..., None].astype(jnp.float32) * inv_freq_E2)[:, :, None, :]
    sin, cos = jnp.sin(angles_BxLx1xE2), jnp.cos(angles_BxLx1xE2)
    x = x_BxLxNxE.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxNxE.dtype)


def attention_mask(mask_BxS, causal: bool, length: int, segment_ids_BxL=None):
    """Boolean mask_Bx1xLxS of which keys each query may see: never padding keys, never the
    future (decoder), and never another packed example (same segment id only)."""
    allowed_BxLxS = jnp.ones((1, length, length), dtype=bool)
    if causal:
        allowed_BxLxS = jnp.tril(allowed_BxLxS)
    if mask_BxS is not None:
        allowed_BxLxS = allowed_BxLxS & mask_BxS[:, None, :].astype(bool)
    if segment_ids_BxL is not None:
        allowed_BxLxS = allowed_BxLxS & (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])
    return allowed_BxLxS[:, None, :, :]


def decode_attention_mask(key_mask_BxS, cache_index, length: int):
    """Boolean mask_Bx1xLxS for `length` new tokens written to cache slots [cache_index,
    cache_index + length): each sees the real (key_mask) slots up to and including its own."""
    query_slot_L = cache_index + jnp.arange(length)
    causal_LxS = jnp.arange(key_mask_BxS.shape[1])[None, :] <= query_slot_L[:, None]
    return (causal_LxS[None, :, :] & key_mask_BxS[:, None, :])[:, None, :, :]


class Attention(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x_BxLxD, allowed_Bx1xLxS, positions_BxL, cache_index=None):
        cfg = self.cfg
        # GPT-2's scaled init of residual projections keeps the residual stream's variance flat.
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        q_BxLxHxE = ModelToHeads(cfg, cfg.n_heads, "heads", name="query")(x_BxLxD)
        k_BxSxKxE = ModelToHeads(cfg, cfg.n_kv_heads, "kv_heads", name="key")(x_BxLxD)
        v_BxSxKxE = ModelToHeads(cfg, cfg.n_kv_heads, "kv_heads", name="value")(x_BxLxD)
        if cfg.positions == "rope":
            q_BxLxHxE = rotary_embedding(q_BxLxHxE, positions_BxL, cfg.rope_theta)
            k_BxSxKxE = rotary_embedding(k_BxSxKxE, positions_BxL, cfg.rope_theta)
        if cache_index is not None:
            # Decoding: write these L keys/values (rotated, in the compute dtype) into the layer's
            # cache at slots [cache_index, cache_index + L) and attend over the whole cache. The
            # cache is created as long as the first call's input, which `init_cache` makes the full
            # prompt + generation length, so its shape never changes while decoding. It is stored
            # heads-first, the layout attention's batched matmuls read: stored as BxSxKxE, XLA
            # copied the whole cache into that layout at every step (1.7x slower at S = 416).
            k_BxKxSxE, v_BxKxSxE = k_BxSxKxE.transpose(0, 2, 1, 3), v_BxSxKxE.transpose(0, 2, 1, 3)
            cached_key = self.variable("cache", "cached_key", jnp.zeros, k_BxKxSxE.shape, k_BxKxSxE.dtype)
            cached_value = self.variable("cache", "cached_value", jnp.zeros, v_BxKxSxE.shape, v_BxKxSxE.dtype)
            k_BxKxSxE = lax.dynamic_update_slice(cached_key.value, k_BxKxSxE, (0, 0, cache_index, 0))
            v_BxKxSxE = lax.dynamic_update_slice(cached_value.value, v_BxKxSxE, (0, 0, cache_index, 0))
            cached_key.value, cached_value.value = k_BxKxSxE, v_BxKxSxE
            k_BxSxKxE, v_BxSxKxE = k_BxKxSxE.transpose(0, 2, 1, 3), v_BxKxSxE.transpose(0, 2, 1, 3)
        q_BxLxHxE = nn.with_logical_constraint(q_BxLxHxE, ("act_batch", "act_length", "act_heads", None))
        k_BxSxKxE = nn.with_logical_constraint(k_BxSxKxE, ("act_batch", "act_length", "act_heads", None))
        v_BxSxKxE = nn.with_logical_constraint(v_BxSxKxE, ("act_batch", "act_length", "act_heads", None))

        if cfg.attention_impl == "einsum":
            # Blocks only where the mask is causal over the input itself (not when decoding).
            causal_block = cfg.attention_block if cfg.causal and cache_index is None else 0
            out_BxLxHxE = _einsum_attention(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, allowed_Bx1xLxS,
                                            causal_block=causal_block)
        else:
            out_BxLxHxE = jax.nn.dot_product_attention(
                q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, mask=allowed_Bx1xLxS,
                implementation=cfg.attention_impl)
        out_BxLxHxE = nn.with_logical_constraint(out_BxLxHxE, ("act_batch", "act_length", "act_heads", None))
        return HeadsToModel(cfg, out_std, name="out")(out_BxLxHxE)


# The attention projections are einsums over explicit 3-D kernels because DenseGeneral
# initialises multi-axis kernels flattened, which would lose the per-axis logical names.
class ModelToHeads(nn.Module):
    """D -> (N heads, E): the query, key and value projections."""

    cfg: TransformerConfig
    heads: int
    head_axis: str  # logical name of the heads axis: "heads" or "kv_heads"

    @nn.compact
    def __call__(self, x_BxLxD):
        cfg = self.cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kernel_DxNxE = self.param("kernel", _partitioned(_dense_init(0.02), ("embed", self.head_axis, "kv")),
                                  (cfg.d_model, self.heads, cfg.head_dim), param_dtype)
        y_BxLxNxE = jnp.einsum("bld,dne->blne", x_BxLxD.astype(dtype), kernel_DxNxE.astype(dtype))
        if cfg.use_bias:
            y_BxLxNxE += self.param("bias", _partitioned(nn.initializers.zeros, (self.head_axis, "kv")),
                                    (self.heads, cfg.head_dim), param_dtype).astype(dtype)
        return y_BxLxNxE


class HeadsToModel(nn.Module):
    """(H heads, E) -> D: the attention output projection."""

    cfg: TransformerConfig
    init_std: float

    @nn.compact
    def __call__(self, x_BxLxHxE):
        cfg = self.cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kernel_HxExD = self.param("kernel", _partitioned(_dense_init(self.init_std), ("heads", "kv", "embed")),
                                  (cfg.n_heads, cfg.head_dim, cfg.d_model), param_dtype)
        y_BxLxD = jnp.einsum("blhe,hed->bld", x_BxLxHxE.astype(dtype), kernel_HxExD.astype(dtype))
        if cfg.use_bias:
            y_BxLxD += self.param("bias", _partitioned(nn.initializers.zeros, ("embed",)),
                                  (cfg.d_model,), param_dtype).astype(dtype)
        return y_BxLxD


def _einsum_attention(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, allowed_Bx1xLxS, *, causal_block: int = 0):
    """Softmax attention from batched einsums; grouped-query heads share K/V without copying them.

    Laid out for XLA's CPU dot kernels, measured (benchmarks/README.md, "attention"): heads
    before positions (B K G L E), so each batched matmul reads contiguous [L, E] tiles; the
    1/sqrt(E) scale applied to q (L x E numbers) rather than to the scores (L x S).

    `causal_block` > 0 (a causal mask over the same L = S positions, i.e. training, not
    decoding): queries go in blocks of that many, and block i computes scores only against keys
    [0, (i + 1) * block), the ones it may see, skipping the masked upper triangle: 5/8 of the
    score work at L = 4 blocks. Exact for every query that sees at least one key; a query with
    no allowed key at all (padding) gets uniform weights over its block's keys instead of all.
    """
    B, L, H, E = q_BxLxHxE.shape
    S, K = k_BxSxKxE.shape[1], k_BxSxKxE.shape[2]
    G = H // K
    q_BxKxGxLxE = (q_BxLxHxE * np.asarray(1 / np.sqrt(E), q_BxLxHxE.dtype)).reshape(B, L, K, G, E).transpose(0, 2, 3, 1, 4)
    k_BxKxSxE = k_BxSxKxE.transpose(0, 2, 1, 3)
    v_BxKxSxE = v_BxSxKxE.transpose(0, 2, 1, 3)
    allowed_Bx1x1xLxS = allowed_Bx1xLxS[:, :, None]

    def attend(q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, allowed_Bx1x1xLxS):
        scores_BxKxGxLxS = jnp.einsum("bkgle,bkse->bkgls", q_BxKxGxLxE, k_BxKxSxE).astype(jnp.float32)
        # A finite "minus infinity" keeps fully masked rows (padding queries) free of NaNs.
        scores_BxKxGxLxS = jnp.where(allowed_Bx1x1xLxS, scores_BxKxGxLxS, jnp.finfo(jnp.float32).min)
        probs_BxKxGxLxS = jax.nn.softmax(scores_BxKxGxLxS, axis=-1).astype(v_BxKxSxE.dtype)
        return jnp.einsum("bkgls,bkse->bkgle", probs_BxKxGxLxS, v_BxKxSxE)

    if causal_block and L == S and L > causal_block and L % causal_block == 0:
        blocks = []
        for start in range(0, L, causal_block):
            end = start + causal_block  # keys past the block's last query are all masked
            blocks.append(attend(q_BxKxGxLxE[:, :, :, start:end], k_BxKxSxE[:, :, :end], v_BxKxSxE[:, :, :end],
                                 allowed_Bx1x1xLxS[:, :, :, start:end, :end]))
        out_BxKxGxLxE = jnp.concatenate(blocks, axis=3)
    else:
        out_BxKxGxLxE = attend(q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, allowed_Bx1x1xLxS)
    return out_BxKxGxLxE.transpose(0, 3, 1, 2, 4).reshape(B, L, H, E)


class Mlp(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x_BxLxD):
        cfg = self.cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

        def dense(name, features, axes, std):
            return nn.Dense(features, use_bias=cfg.use_bias, dtype=dtype, param_dtype=param_dtype,
                            name=name, kernel_init=_partitioned(_dense_init(std), axes),
                            bias_init=_partitioned(nn.initializers.zeros, axes[-1:]))

        if cfg.mlp == "swiglu":
            gate_BxLxF = dense("gate", cfg.d_ff, ("embed", "mlp"), 0.02)(x_BxLxD)
            up_BxLxF = dense("up", cfg.d_ff, ("embed", "mlp"), 0.02)(x_BxLxD)
            h_BxLxF = nn.silu(gate_BxLxF) * up_BxLxF
        else:
            # Exact (erf) GELU by default, as BERT; GPT-2 checkpoints ("gelu_new", ~1e-3 away) set
            # model.gelu_approximate.
            up_BxLxF = dense("up", cfg.d_ff, ("embed", "mlp"), 0.02)(x_BxLxD)
            h_BxLxF = nn.gelu(up_BxLxF, approximate=cfg.gelu_approximate)
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("act_batch", "act_length", "act_mlp"))
        return dense("down", cfg.d_model, ("mlp", "embed"), 0.02 / math.sqrt(2 * cfg.n_layers))(h_BxLxF)


class Block(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x_BxLxD, allowed_Bx1xLxS, positions_BxL, deterministic: bool, cache_index=None):
        cfg = self.cfg
        dropout = nn.Dropout(cfg.dropout)
        if cfg.norm_position == "pre":
            h = Attention(cfg, name="attn")(Norm(cfg, name="attn_norm")(x_BxLxD), allowed_Bx1xLxS, positions_BxL,
                                            cache_index)
            x_BxLxD = x_BxLxD + dropout(h, deterministic=deterministic)
            h = Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x_BxLxD))
            x_BxLxD = x_BxLxD + dropout(h, deterministic=deterministic)
        else:  # post-norm, as the original BERT
            h = Attention(cfg, name="attn")(x_BxLxD, allowed_Bx1xLxS, positions_BxL, cache_index)
            x_BxLxD = Norm(cfg, name="attn_norm")(x_BxLxD + dropout(h, deterministic=deterministic))
            h = Mlp(cfg, name="mlp")(x_BxLxD)
            x_BxLxD = Norm(cfg, name="mlp_norm")(x_BxLxD + dropout(h, deterministic=deterministic))
        return nn.with_logical_constraint(x_BxLxD, ("act_batch", "act_length", "act_embed"))


_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nn.Module):
    """tokens_BxL -> logits_BxLxV (next-token logits for a decoder, MLM logits for an encoder).

    `mask_BxL` marks real tokens (1) vs padding (0); padding keys are never attended to.
    `segment_ids_BxL` (with `positions_BxL` restarting at 0 per example) keeps packed examples
    from attending to each other. `return_hidden=True` returns the final hidden states instead
    (for scalar/reward heads).

    `decode=True` (decoders; apply with `mutable=["cache"]` and a cache from `init_cache`) appends
    the L tokens to the cache and attends over everything cached so far: a prompt of L tokens
    (prefill), then one token per call. `mask_BxL` marks which of the new tokens are real, so
    prompts of different lengths can be left-padded into one batch; unless `positions_BxL` is
    given, a token's position is the number of real tokens before it, so padding shifts neither
    learned nor rotary positions.
    """

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, tokens_BxL, *, mask_BxL=None, token_types_BxL=None, positions_BxL=None,
                 segment_ids_BxL=None, deterministic: bool = True, return_hidden: bool = False,
                 decode: bool = False):
        cfg = self.cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        B, L = tokens_BxL.shape
        if decode:
            if not cfg.causal or segment_ids_BxL is not None:
                raise ValueError("decode=True needs a decoder (model.kind='decoder') and no segment ids")
            cache_index, key_mask_BxS, positions_BxL = self._advance_cache(mask_BxL, positions_BxL, B, L)
            allowed_Bx1xLxS = decode_attention_mask(key_mask_BxS, cache_index, L)
        else:
            cache_index = None
            allowed_Bx1xLxS = attention_mask(mask_BxL, cfg.causal, L, segment_ids_BxL)
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))

        token_embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                               embedding_init=_partitioned(_dense_init(0.02), ("vocab", "embed")),
                               name="token_embed")
        x_BxLxD = token_embed(tokens_BxL)
        if cfg.positions == "learned":
            x_BxLxD += nn.Embed(cfg.max_len, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                                embedding_init=_partitioned(_dense_init(0.01), (None, "embed")),
                                name="position_embed")(positions_BxL)
        if cfg.type_vocab_size:
            if token_types_BxL is None:
                token_types_BxL = jnp.zeros_like(tokens_BxL)
            x_BxLxD += nn.Embed(cfg.type_vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                                embedding_init=_partitioned(_dense_init(0.02), (None, "embed")),
                                name="type_embed")(token_types_BxL)
        if cfg.embed_norm:
            x_BxLxD = Norm(cfg, name="embed_norm")(x_BxLxD)
        x_BxLxD = nn.Dropout(cfg.dropout)(x_BxLxD, deterministic=deterministic)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD.astype(dtype), ("act_batch", "act_length", "act_embed"))

        block_cls = Block
        if cfg.remat != "none" and not decode:  # no backward pass when decoding: nothing to rematerialise
            # deterministic (argument 4, counting self) is a Python bool: static for remat.
            block_cls = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], static_argnums=(4,))
        for i in range(cfg.n_layers):
            x_BxLxD = block_cls(cfg, name=f"block_{i}")(x_BxLxD, allowed_Bx1xLxS, positions_BxL, deterministic,
                                                       cache_index)

        if cfg.norm_position == "pre":
            x_BxLxD = Norm(cfg, name="final_norm")(x_BxLxD)
        if return_hidden:
            return x_BxLxD
        if cfg.head == "scalar":
            return self._scalar_head(x_BxLxD, mask_BxL)
        if cfg.kind == "encoder" and cfg.mlm_head_transform:
            # BERT's MLM transform: dense -> GELU -> norm before the (tied) vocabulary projection.
            x_BxLxD = nn.Dense(cfg.d_model, dtype=dtype, param_dtype=param_dtype, name="mlm_transform",
                               kernel_init=_partitioned(_dense_init(0.02), ("embed", "mlp")),
                               bias_init=_partitioned(nn.initializers.zeros, ("mlp",)))(x_BxLxD)
            x_BxLxD = Norm(cfg, name="mlm_norm")(nn.gelu(x_BxLxD, approximate=cfg.gelu_approximate))
        if cfg.tie_embeddings:
            logits_BxLxV = token_embed.attend(x_BxLxD)
            if cfg.kind == "encoder":
                logits_BxLxV += self.param("mlm_bias", _partitioned(nn.initializers.zeros, ("vocab",)),
                                           (cfg.vocab_size,), param_dtype).astype(dtype)
        else:
            logits_BxLxV = nn.Dense(cfg.vocab_size, use_bias=cfg.kind == "encoder", dtype=dtype,
                                    param_dtype=param_dtype, name="lm_head",
                                    kernel_init=_partitioned(_dense_init(0.02), ("embed", "vocab")),
                                    bias_init=_partitioned(nn.initializers.zeros, ("vocab",)))(x_BxLxD)
        return nn.with_logical_constraint(logits_BxLxV, ("act_batch", "act_length", "act_vocab"))

    def _scalar_head(self, x_BxLxD, mask_BxL):
        """A reward per sequence, read at its last real token (sequences are right-padded): the
        only position that has seen the whole prompt and response under causal attention."""
        B, L, _ = x_BxLxD.shape
        last_B = (jnp.full((B,), L) if mask_BxL is None else jnp.sum(mask_BxL, axis=1)) - 1
        x_BxD = jnp.take_along_axis(x_BxLxD, jnp.maximum(last_B, 0)[:, None, None], axis=1)[:, 0]
        reward_Bx1 = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.dtype(self.cfg.param_dtype), name="reward_head",
                              kernel_init=_partitioned(nn.initializers.zeros, ("embed", None)),
                              bias_init=_partitioned(nn.initializers.zeros, (None,)))(x_BxD.astype(jnp.float32))
        return reward_Bx1[:, 0]

    def _advance_cache(self, mask_BxL, positions_BxL, B: int, L: int):
        """Decoding bookkeeping shared by all layers: the slot the L new tokens start at, which
        cache slots hold real tokens (key_mask_BxS, with the new ones), and their positions."""
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        key_mask = self.variable("cache", "key_mask", jnp.zeros, (B, L), jnp.bool_)
        cache_index = index.value
        new_mask_BxL = jnp.ones((B, L), jnp.bool_) if mask_BxL is None else mask_BxL.astype(jnp.bool_)
        key_mask_BxS = lax.dynamic_update_slice(key_mask.value, new_mask_BxL, (0, cache_index))
        if positions_BxL is None:
            positions_BxS = jnp.cumsum(key_mask_BxS, axis=1, dtype=jnp.int32) - 1
            positions_BxL = jnp.maximum(lax.dynamic_slice_in_dim(positions_BxS, cache_index, L, axis=1), 0)
        index.value, key_mask.value = cache_index + L, key_mask_BxS
        return cache_index, key_mask_BxS, positions_BxL


def init_cache(model: Transformer, batch_size: int, length: int):
    """A zeroed decode cache for `batch_size` rows of up to `length` tokens (prompt + generated):
    per layer `cached_key` / `cached_value` [B, K, S, E] in the compute dtype, plus the next write
    slot (`index`) and which slots hold real tokens (`key_mask` [B, S]). Shapes come from
    `jax.eval_shape`, so nothing is computed; writing past `length` is not checked (the slot
    index would be clamped), so size it for the whole generation."""
    tokens = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
    shapes = jax.eval_shape(functools.partial(model.init, decode=True), jax.random.key(0), tokens)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


# --------------------------------------------------------------------------------------------
# Parameter counting
# --------------------------------------------------------------------------------------------

def parameter_counts(params) -> dict[str, int]:
    """Total parameters and non-embedding ones (Kaplan et al.'s N).

    Embeddings are every table named `embedding` (tokens, positions, token types) and an untied
    output head; a tied head shares the token table so it is not counted twice.
    """
    total, embedding = 0, 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
        size = int(np.prod(leaf.shape))
        total += size
        if names[-1] == "embedding" or "lm_head" in names:
            embedding += size
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def make_model(cfg: TransformerConfig) -> nn.Module:
    """The module of a config: the Transformer, or for `kind='word2vec'` the skip-gram model."""
    if cfg.kind == "word2vec":
        from llm_jax import word2vec  # here: word2vec.py builds on this module's config
        return word2vec.SkipGram(cfg)
    return Transformer(cfg)


def init_params_shape(cfg: TransformerConfig, batch_size: int = 1, seq_len: int | None = None):
    """Abstract (boxed) parameter shapes without allocating anything."""
    seq_len = seq_len or cfg.max_len
    model = make_model(cfg)
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    return jax.eval_shape(functools.partial(model.init, deterministic=True), jax.random.key(0), tokens)
