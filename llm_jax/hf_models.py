"""The Hugging Face architectures llm_jax reads and writes: GPT-2 (GPT2LMHeadModel), LLaMA
(LlamaForCausalLM) and BERT (BertForMaskedLM, BertModel). For each, how its config.json maps to a
`TransformerConfig` (and back), and which HF tensor holds which of our parameters (`Tensor`).
convert.py does the reading and writing.

Every HF tensor is one of our parameters, or several side by side (GPT-2's c_attn holds q, k and
v), reshaped and, where torch's Linear stores [out, in], transposed: nothing is computed, so a
round trip gives the same bits.
"""
from __future__ import annotations

import dataclasses

from llm_jax import model as model_lib

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "BertForMaskedLM": "bert",
                 "BertModel": "bert"}
# Each family's base model, whose tensor names carry this prefix inside a model with a head
# ("transformer.h.0...") and none when it was saved alone (the hub's gpt2 holds "h.0...").
_BASE_PREFIX = {"gpt2": "transformer.", "llama": "model.", "bert": "bert."}
_HEAD_NAMES = ("lm_head.", "cls.")
_GELU = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}  # HF activation -> tanh approximation


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One HF tensor and the parameters of ours it holds, each a reshape of an equal slice of its
    last axis (after the transpose)."""

    name: str  # without the base model's prefix
    shape: tuple[int, ...]  # HF's
    ours: tuple[str, ...]  # our parameter paths, "block_0/attn/query/kernel"
    transpose: bool = False  # torch's Linear weight is [out, in], our kernels [in, out]
    aliases: tuple[str, ...] = ()  # other names of the same tensor across transformers versions


def _linear(name: str, ours: str, shape: tuple[int, int], bias: bool) -> list[Tensor]:
    """A torch Linear of weight `shape` = (out, in): our kernel [in, ...] and bias."""
    tensors = [Tensor(f"{name}.weight", shape, (f"{ours}/kernel",), transpose=True)]
    return tensors + ([Tensor(f"{name}.bias", shape[:1], (f"{ours}/bias",))] if bias else [])


def _norm(name: str, ours: str, d_model: int, bias: bool = True) -> list[Tensor]:
    tensors = [Tensor(f"{name}.weight", (d_model,), (f"{ours}/scale",))]
    return tensors + ([Tensor(f"{name}.bias", (d_model,), (f"{ours}/bias",))] if bias else [])


def _gpt2_tensors(cfg: model_lib.TransformerConfig) -> list[Tensor]:
    # GPT-2's Conv1D stores [in, out], our layout: no transposes.
    D, F, HE = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim
    tensors = [Tensor("wte.weight", (cfg.vocab_size, D), ("token_embed/embedding",)),
               Tensor("wpe.weight", (cfg.max_len, D), ("position_embed/embedding",))]
    for i in range(cfg.n_layers):
        hf, ours = f"h.{i}.", f"block_{i}/"
        qkv = tuple(f"{ours}attn/{name}/" for name in ("query", "key", "value"))
        tensors += [*_norm(f"{hf}ln_1", f"{ours}attn_norm", D),
                    Tensor(f"{hf}attn.c_attn.weight", (D, 3 * HE), tuple(p + "kernel" for p in qkv)),
                    Tensor(f"{hf}attn.c_attn.bias", (3 * HE,), tuple(p + "bias" for p in qkv)),
                    Tensor(f"{hf}attn.c_proj.weight", (HE, D), (f"{ours}attn/out/kernel",)),
                    Tensor(f"{hf}attn.c_proj.bias", (D,), (f"{ours}attn/out/bias",)),
                    *_norm(f"{hf}ln_2", f"{ours}mlp_norm", D),
                    Tensor(f"{hf}mlp.c_fc.weight", (D, F), (f"{ours}mlp/up/kernel",)),
                    Tensor(f"{hf}mlp.c_fc.bias", (F,), (f"{ours}mlp/up/bias",)),
                    Tensor(f"{hf}mlp.c_proj.weight", (F, D), (f"{ours}mlp/down/kernel",)),
                    Tensor(f"{hf}mlp.c_proj.bias", (D,), (f"{ours}mlp/down/bias",))]
    tensors += _norm("ln_f", "final_norm", D)
    if not cfg.tie_embeddings:
        tensors.append(Tensor("lm_head.weight", (cfg.vocab_size, D), ("lm_head/kernel",), transpose=True))
    return tensors


def _llama_tensors(cfg: model_lib.TransformerConfig) -> list[Tensor]:
    D, F, bias = cfg.d_model, cfg.d_ff, cfg.use_bias
    HE, KE = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    tensors = [Tensor("embed_tokens.weight", (cfg.vocab_size, D), ("token_embed/embedding",))]
    for i in range(cfg.n_layers):
        hf, ours = f"layers.{i}.", f"block_{i}/"
        tensors += [*_norm(f"{hf}input_layernorm", f"{ours}attn_norm", D, bias=False),
                    *_linear(f"{hf}self_attn.q_proj", f"{ours}attn/query", (HE, D), bias),
                    *_linear(f"{hf}self_attn.k_proj", f"{ours}attn/key", (KE, D), bias),
                    *_linear(f"{hf}self_attn.v_proj", f"{ours}attn/value", (KE, D), bias),
                    *_linear(f"{hf}self_attn.o_proj", f"{ours}attn/out", (D, HE), bias),
                    *_norm(f"{hf}post_attention_layernorm", f"{ours}mlp_norm", D, bias=False),
                    *_linear(f"{hf}mlp.gate_proj", f"{ours}mlp/gate", (F, D), bias),
                    *_linear(f"{hf}mlp.up_proj", f"{ours}mlp/up", (F, D), bias),
                    *_linear(f"{hf}mlp.down_proj", f"{ours}mlp/down", (D, F), bias)]
    tensors += _norm("norm", "final_norm", D, bias=False)
    if not cfg.tie_embeddings:
        tensors.append(Tensor("lm_head.weight", (cfg.vocab_size, D), ("lm_head/kernel",), transpose=True))
    return tensors


def _bert_tensors(cfg: model_lib.TransformerConfig, mlm: bool) -> list[Tensor]:
    D, F, HE, V = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim, cfg.vocab_size
    tensors = [Tensor("embeddings.word_embeddings.weight", (V, D), ("token_embed/embedding",)),
               Tensor("embeddings.position_embeddings.weight", (cfg.max_len, D), ("position_embed/embedding",)),
               Tensor("embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, D), ("type_embed/embedding",)),
               *_norm("embeddings.LayerNorm", "embed_norm", D)]
    for i in range(cfg.n_layers):
        hf, ours = f"encoder.layer.{i}.", f"block_{i}/"
        tensors += [*_linear(f"{hf}attention.self.query", f"{ours}attn/query", (HE, D), True),
                    *_linear(f"{hf}attention.self.key", f"{ours}attn/key", (HE, D), True),
                    *_linear(f"{hf}attention.self.value", f"{ours}attn/value", (HE, D), True),
                    *_linear(f"{hf}attention.output.dense", f"{ours}attn/out", (D, HE), True),
                    *_norm(f"{hf}attention.output.LayerNorm", f"{ours}attn_norm", D),
                    *_linear(f"{hf}intermediate.dense", f"{ours}mlp/up", (F, D), True),
                    *_linear(f"{hf}output.dense", f"{ours}mlp/down", (D, F), True),
                    *_norm(f"{hf}output.LayerNorm", f"{ours}mlp_norm", D)]
    if not mlm:
        return tensors
    tensors += [*_linear("cls.predictions.transform.dense", "mlm_transform", (D, D), True),
                *_norm("cls.predictions.transform.LayerNorm", "mlm_norm", D)]
    if cfg.tie_embeddings:
        return tensors + [Tensor("cls.predictions.bias", (V,), ("mlm_bias",))]
    # Untied, transformers 5 uses the decoder's own bias; 4.x tied it to cls.predictions.bias.
    return tensors + [Tensor("cls.predictions.decoder.weight", (V, D), ("lm_head/kernel",), transpose=True),
                      Tensor("cls.predictions.decoder.bias", (V,), ("lm_head/bias",),
                             aliases=("cls.predictions.bias",))]


def tensor_list(cfg: model_lib.TransformerConfig, architecture: str) -> list[Tensor]:
    if ARCHITECTURES[architecture] == "bert":
        return _bert_tensors(cfg, mlm=architecture == "BertForMaskedLM")
    return _gpt2_tensors(cfg) if ARCHITECTURES[architecture] == "gpt2" else _llama_tensors(cfg)


_REQUIRED = object()


def _get(hf: dict, key: str, where: str, default=_REQUIRED):
    """A field of a Hugging Face config.json (optional ones with transformers' default)."""
    if hf.get(key) is None and default is _REQUIRED:
        raise ValueError(f"{where}: no {key!r}")
    return default if hf.get(key) is None else hf[key]


def _require(hf: dict, where: str, **expected) -> None:
    """Fields whose other values change the computation in ways our model does not implement."""
    for key, value in expected.items():
        if hf.get(key) not in (None, value):
            raise ValueError(f"{where}: {key}={hf[key]!r} is not supported (only {value!r})")


def _gelu_approximate(hf: dict, key: str, default: str, where: str) -> bool:
    activation = _get(hf, key, where, default)
    if activation not in _GELU:
        raise ValueError(f"{where}: {key}={activation!r} is not supported (one of {sorted(_GELU)})")
    return _GELU[activation]


def _rope_theta(hf: dict, where: str) -> float:
    """transformers 5 writes rope_parameters {rope_type, rope_theta}; 4.x rope_theta and rope_scaling."""
    parameters = hf.get("rope_parameters") or {}
    for settings in (parameters, hf.get("rope_scaling") or {}):
        kind = settings.get("rope_type", settings.get("type", "default"))
        if kind != "default":
            raise ValueError(f"{where}: rope_scaling type {kind!r} is not supported (only the default RoPE)")
        if settings.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{where}: partial_rotary_factor={settings['partial_rotary_factor']} is not supported")
    return float(parameters.get("rope_theta", _get(hf, "rope_theta", where, 10_000.0)))


def _gpt2_config(hf: dict, where: str) -> model_lib.TransformerConfig:
    _require(hf, where, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
    d_model, n_heads = _get(hf, "n_embd", where), _get(hf, "n_head", where)
    return model_lib.TransformerConfig(
        vocab_size=_get(hf, "vocab_size", where), d_model=d_model, n_layers=_get(hf, "n_layer", where),
        n_heads=n_heads, n_kv_heads=n_heads, head_dim=d_model // n_heads,
        d_ff=_get(hf, "n_inner", where, 4 * d_model), max_len=_get(hf, "n_positions", where), kind="decoder",
        norm="layernorm", norm_eps=_get(hf, "layer_norm_epsilon", where, 1e-5), mlp="gelu",
        gelu_approximate=_gelu_approximate(hf, "activation_function", "gelu_new", where), positions="learned",
        tie_embeddings=_get(hf, "tie_word_embeddings", where, True), use_bias=True, norm_position="pre",
        embed_norm=False, type_vocab_size=0, mlm_head_transform=False)


def _llama_config(hf: dict, where: str) -> model_lib.TransformerConfig:
    _require(hf, where, hidden_act="silu")
    bias = _get(hf, "attention_bias", where, False)
    if _get(hf, "mlp_bias", where, False) != bias:
        raise ValueError(f"{where}: attention_bias={bias} with mlp_bias={not bias} is not supported (both alike)")
    d_model, n_heads = _get(hf, "hidden_size", where), _get(hf, "num_attention_heads", where)
    return model_lib.TransformerConfig(
        vocab_size=_get(hf, "vocab_size", where), d_model=d_model, n_layers=_get(hf, "num_hidden_layers", where),
        n_heads=n_heads, n_kv_heads=_get(hf, "num_key_value_heads", where, n_heads),
        head_dim=_get(hf, "head_dim", where, d_model // n_heads), d_ff=_get(hf, "intermediate_size", where),
        max_len=_get(hf, "max_position_embeddings", where), kind="decoder", norm="rmsnorm",
        norm_eps=_get(hf, "rms_norm_eps", where, 1e-6), mlp="swiglu", positions="rope",
        rope_theta=_rope_theta(hf, where), tie_embeddings=_get(hf, "tie_word_embeddings", where, False),
        use_bias=bias, norm_position="pre", embed_norm=False, type_vocab_size=0, mlm_head_transform=False)


def _bert_config(hf: dict, where: str) -> model_lib.TransformerConfig:
    _require(hf, where, position_embedding_type="absolute", is_decoder=False, add_cross_attention=False)
    d_model, n_heads = _get(hf, "hidden_size", where), _get(hf, "num_attention_heads", where)
    return model_lib.TransformerConfig(
        vocab_size=_get(hf, "vocab_size", where), d_model=d_model, n_layers=_get(hf, "num_hidden_layers", where),
        n_heads=n_heads, n_kv_heads=n_heads, head_dim=d_model // n_heads, d_ff=_get(hf, "intermediate_size", where),
        max_len=_get(hf, "max_position_embeddings", where), kind="encoder", norm="layernorm",
        norm_eps=_get(hf, "layer_norm_eps", where, 1e-12), mlp="gelu",
        gelu_approximate=_gelu_approximate(hf, "hidden_act", "gelu", where), positions="learned",
        tie_embeddings=_get(hf, "tie_word_embeddings", where, True), use_bias=True, norm_position="post",
        embed_norm=True, type_vocab_size=_get(hf, "type_vocab_size", where, 2), mlm_head_transform=True)


_CONFIG_READERS = {"gpt2": _gpt2_config, "llama": _llama_config, "bert": _bert_config}


def _check_fields(cfg, architecture: str, **expected) -> None:
    for field, value in expected.items():
        if getattr(cfg, field) != value:
            raise ValueError(f"model.{field}={getattr(cfg, field)!r} has no counterpart in {architecture} "
                             f"(it needs {value!r})")


def export_architecture(cfg: model_lib.TransformerConfig, param_names) -> str:
    """The HF architecture that computes what `cfg` does; a field it cannot express is named."""
    if cfg.head != "lm":
        raise ValueError(f"model.head={cfg.head!r} (a reward model) has no Hugging Face counterpart here")
    common = dict(norm_position="pre", embed_norm=False, type_vocab_size=0)
    if cfg.kind == "decoder" and cfg.positions == "rope":
        _check_fields(cfg, "LlamaForCausalLM", norm="rmsnorm", mlp="swiglu", **common)
        return "LlamaForCausalLM"
    dense = dict(n_kv_heads=cfg.n_heads, head_dim=cfg.d_model // cfg.n_heads, use_bias=True, norm="layernorm",
                 mlp="gelu", positions="learned")
    if cfg.kind == "decoder":
        _check_fields(cfg, "GPT2LMHeadModel", **dense, **common)
        return "GPT2LMHeadModel"
    if cfg.kind != "encoder":
        raise ValueError(f"model.kind={cfg.kind!r} has no Hugging Face counterpart here")
    _check_fields(cfg, "BertModel", **dense, norm_position="post", embed_norm=True)
    if cfg.type_vocab_size < 1:
        raise ValueError("model.type_vocab_size=0 has no counterpart in BertModel (it needs token types)")
    if not any(name.startswith(("mlm_", "lm_head")) for name in param_names):
        return "BertModel"
    _check_fields(cfg, "BertForMaskedLM", mlm_head_transform=True)
    return "BertForMaskedLM"


def hf_config(cfg: model_lib.TransformerConfig, architecture: str, token_ids: dict | None = None) -> dict:
    """config.json for `architecture` (see `export_architecture`); `token_ids`: bos/eos/pad_token_id."""
    family = ARCHITECTURES[architecture]
    common = {"architectures": [architecture], "model_type": family, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32",
              **{f"{name}_token_id": None for name in ("bos", "eos", "pad")}, **(token_ids or {})}
    activation = "gelu_new" if cfg.gelu_approximate else "gelu"
    if family == "gpt2":
        return {**common, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
                "n_positions": cfg.max_len, "activation_function": activation, "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                "scale_attn_weights": True}
    if family == "llama":
        # rope_theta for transformers 4.x, rope_parameters for 5.
        return {**common, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
                "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
                "intermediate_size": cfg.d_ff, "hidden_act": "silu", "max_position_embeddings": cfg.max_len,
                "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                "attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias, "attention_dropout": cfg.dropout}
    return {**common, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff, "hidden_act": activation,
            "max_position_embeddings": cfg.max_len, "type_vocab_size": cfg.type_vocab_size,
            "layer_norm_eps": cfg.norm_eps, "position_embedding_type": "absolute",
            "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout}


def stored_names(name: str, architecture: str) -> list[str]:
    """Where a tensor may be in a file, the name this module writes first: a head's own name, or a
    base tensor with the head model's prefix or none (a base model saved alone)."""
    if name.startswith(_HEAD_NAMES):
        return [name]
    prefix = _BASE_PREFIX[ARCHITECTURES[architecture]]
    return [name, prefix + name] if architecture == "BertModel" else [prefix + name, name]


def read_config(hf: dict, where: str) -> tuple[str, model_lib.TransformerConfig]:
    """(architecture, TransformerConfig) of a config.json's contents; `where` names the file in errors."""
    if not hf.get("architectures"):
        raise ValueError(f"{where}: no 'architectures' (one of {', '.join(ARCHITECTURES)})")
    architecture = hf["architectures"][0]
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{where}: architecture {architecture!r} is not supported (one of {', '.join(ARCHITECTURES)})")
    return architecture, _CONFIG_READERS[ARCHITECTURES[architecture]](hf, where)
