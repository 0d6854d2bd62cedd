"""Hugging Face checkpoints in and out: GPT-2 (GPT2LMHeadModel), LLaMA (LlamaForCausalLM) and BERT
(BertForMaskedLM, BertModel), as local folders of config.json + safetensors (one file, or shards
listed by model.safetensors.index.json). Only safetensors and JSON are read, never a pickle: a
pytorch_model.bin can run code when it is loaded.

    python -m llm_jax.convert import --hf_dir=/path/to/hf_model --workdir=runs/hf
    python -m llm_jax.main --config=configs/finetune.py:init_from=runs/hf,task=sft --workdir=runs/hf_sft
    python -m llm_jax.convert export --workdir=runs/hf_sft --hf_dir=/tmp/hf_sft

`load_hf(path) -> (TransformerConfig, params)` and `save_hf(model_cfg, params, path)` are the
library: params are a tree of numpy arrays with the Transformer's names (model.py), and which HF
tensor is which parameter is hf_models.py's table. Import -> export -> import gives the same bits.
Not carried: BertModel's pooler and BERT's next-sentence head (our model has neither); a reward
model's scalar head has no counterpart.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence

import numpy as np
from flax import traverse_util

from llm_jax import hf_models
from llm_jax import model as model_lib

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors checkpoints hold that are no parameters of ours: buffers (GPT-2's causal mask, LLaMA's
# inv_freq, BERT's position ids), BERT's pooler and next-sentence head.
_IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq|position_ids)$|(^|\.)pooler\."
                      r"|^cls\.seq_relationship\.")
# Copies of the token embedding (and BERT's bias) that a tied model may also store.
_TIED_COPIES = ("lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
# The fields that make up the architecture (and its parameters): a run's config.model sets each.
ARCH_FIELDS = ("kind", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_len",
               "norm", "norm_eps", "mlp", "gelu_approximate", "positions", "rope_theta", "tie_embeddings", "use_bias",
               "norm_position", "embed_norm", "type_vocab_size", "mlm_head_transform")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:  # invalid JSON or UTF-8
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _tensor_files(folder: str) -> dict[str, str]:
    """{tensor name: file} of a model folder: one model.safetensors, or the shards of an index."""
    from safetensors import safe_open

    index = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map'")
        files = {name: os.path.join(folder, file) for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not os.path.exists(file):
                raise ValueError(f"{index} lists {os.path.basename(file)}, which is missing from {folder}")
        return files
    single = os.path.join(folder, WEIGHTS_FILE)
    if os.path.exists(single):
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    pickles = sorted(os.path.basename(p) for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt")
                     for p in glob.glob(os.path.join(folder, pattern)))
    if pickles:
        raise ValueError(f"{folder} holds {pickles[0]} (a pickle) but no {WEIGHTS_FILE}: safetensors is required "
                         f"(pickles can run code when loaded); convert it with transformers' save_pretrained")
    raise ValueError(f"{folder} has no {WEIGHTS_FILE} (nor {INDEX_FILE})")


def _read_tensors(files: dict[str, str], names: Sequence[str]) -> dict[str, np.ndarray]:
    """The named tensors as float32 numpy arrays (bf16 and fp16 widen exactly), each file opened once."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    arrays = {}
    for file, wanted in by_file.items():
        with safe_open(file, framework="numpy") as f:
            present = set(f.keys())
            for name in wanted:
                if name not in present:
                    raise ValueError(f"tensor {name!r} is missing from {file}, where the index puts it")
                if f.get_slice(name).get_dtype() == "BF16":  # numpy has no bfloat16: safetensors cannot make one
                    arrays[name] = _read_bf16(file, name)
                else:
                    arrays[name] = f.get_tensor(name).astype(np.float32, copy=False)
    return arrays


def _read_bf16(file: str, name: str) -> np.ndarray:
    """A bfloat16 tensor read by hand: safetensors' layout is an 8-byte header size, the JSON header
    (dtype, shape, byte offsets after the header), then the raw little-endian data."""
    import ml_dtypes

    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(header_size))[name]
        start, end = info["data_offsets"]
        f.seek(8 + header_size + start)
        data = f.read(end - start)
    return np.frombuffer(data, ml_dtypes.bfloat16).reshape(info["shape"]).astype(np.float32)


def _current_name(name: str) -> str:
    """Old BERT checkpoints name LayerNorm parameters gamma / beta."""
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def param_shapes(cfg: model_lib.TransformerConfig) -> dict[str, tuple[int, ...]]:
    """{"block_0/attn/query/kernel": shape, ...} of the model `cfg` builds (traced, nothing allocated)."""
    from flax import linen as nn

    shapes = nn.unbox(model_lib.init_params_shape(cfg, seq_len=1))["params"]
    return {name: tuple(leaf.shape) for name, leaf in traverse_util.flatten_dict(shapes, sep="/").items()}


def load_hf(path: str):
    """(TransformerConfig, params) of a Hugging Face model folder. Params are numpy float32 in our
    names; a BertModel's have no MLM head. Anything unsupported or inconsistent is a one-line
    ValueError naming the architecture, the config field, or the tensor and its file."""
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise ValueError(f"{path} has no {CONFIG_FILE}: not a Hugging Face model folder")
    architecture, cfg = hf_models.read_config(_read_json(config_path), config_path)
    files = _tensor_files(path)
    stored = {_current_name(name): name for name in files}  # the name we look for -> the name in the file
    tensors = hf_models.tensor_list(cfg, architecture)
    found = {}
    for tensor in tensors:
        candidates = [c for name in (tensor.name, *tensor.aliases) for c in hf_models.stored_names(name, architecture)]
        name = next((stored[c] for c in candidates if c in stored), None)
        if name is None:
            raise ValueError(f"tensor {candidates[0]!r} is missing from {path} ({config_path} describes "
                             f"{architecture} with {cfg.n_layers} layers)")
        found[tensor] = name
    known = {c for t in tensors for name in (t.name, *t.aliases) for c in hf_models.stored_names(name, architecture)}
    for name in sorted(stored):  # a tensor we would not read: the folder holds another model than config.json says
        if not (name in known or _IGNORED.search(name) or (cfg.tie_embeddings and name in _TIED_COPIES)):
            raise ValueError(f"unexpected tensor {stored[name]!r} in {files[stored[name]]}: {architecture} as "
                             f"{config_path} describes it has no such parameter")
    arrays = _read_tensors(files, list(found.values()))
    shapes, params = param_shapes(cfg), {}
    for tensor, name in found.items():
        if arrays[name].shape != tensor.shape:
            raise ValueError(f"tensor {name!r} in {files[name]} has shape {arrays[name].shape}, expected "
                             f"{tensor.shape} from {config_path}")
        params.update(_split(tensor, arrays[name], shapes))
    return cfg, traverse_util.unflatten_dict(params, sep="/")


def _split(tensor: hf_models.Tensor, array: np.ndarray, shapes: dict) -> dict[str, np.ndarray]:
    array = array.T if tensor.transpose else array
    parts = np.split(array, len(tensor.ours), axis=-1)
    return {name: np.ascontiguousarray(part).reshape(shapes[name]) for name, part in zip(tensor.ours, parts)}


def _join(tensor: hf_models.Tensor, flat: dict) -> np.ndarray:
    layout = tensor.shape[::-1] if tensor.transpose else tensor.shape  # before the transpose
    part = (*layout[:-1], layout[-1] // len(tensor.ours))
    pieces = []
    for name in tensor.ours:
        value = np.asarray(flat[name], np.float32)
        if value.size != int(np.prod(part)):
            raise ValueError(f"parameter {name} has shape {value.shape}, which does not fit {tensor.name} "
                             f"{tensor.shape}")
        pieces.append(value.reshape(part))
    array = np.concatenate(pieces, axis=-1)
    return np.ascontiguousarray(array.T if tensor.transpose else array)


def save_hf(model_cfg: model_lib.TransformerConfig, params, path: str, *, token_ids: dict | None = None) -> str:
    """Writes config.json + model.safetensors (float32) that transformers' `from_pretrained` loads
    as the same model; returns the architecture. `token_ids`: bos/eos/pad_token_id for config.json."""
    from safetensors.numpy import save_file

    flat = {name: np.asarray(value) for name, value in traverse_util.flatten_dict(dict(params), sep="/").items()}
    architecture = hf_models.export_architecture(model_cfg, flat)
    tensors = hf_models.tensor_list(model_cfg, architecture)
    covered = {name for tensor in tensors for name in tensor.ours}
    for name in sorted(set(flat) ^ covered):
        where = "has no counterpart in" if name in flat else "is missing, and needed by"
        raise ValueError(f"parameter {name} {where} {architecture}")
    out = {}
    for tensor in tensors:
        array = _join(tensor, flat)
        for name in (tensor.name, *tensor.aliases):
            out[hf_models.stored_names(name, architecture)[0]] = array
    os.makedirs(path, exist_ok=True)
    stale = os.path.join(path, INDEX_FILE)  # an index would take precedence over the file written here
    if os.path.exists(stale):
        os.remove(stale)
    save_file(out, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(hf_models.hf_config(model_cfg, architecture, token_ids), f, indent=2, sort_keys=True)
    return architecture


# --------------------------------------------------------------------------------------------
# The command line: a workdir from a Hugging Face folder, and back
# --------------------------------------------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def run_config(model_cfg: model_lib.TransformerConfig, *, tokenizer: str = "byte", tokenizer_path: str = ""):
    """A run config (config_lib.base_config) whose config.model builds exactly `model_cfg`."""
    from llm_jax import config_lib

    config = config_lib.base_config()
    encoder = model_cfg.kind == "encoder"
    config.task = "mlm" if encoder else "lm"
    config.model.style = "bert" if encoder else "llama" if model_cfg.positions == "rope" else "gpt2"
    for field in ARCH_FIELDS:
        config.model[field] = getattr(model_cfg, field)
    config.data.tokenizer, config.data.tokenizer_path = tokenizer, tokenizer_path
    config.data.seq_len = min(config.data.seq_len, model_cfg.max_len)
    return config


def _copy_tokenizer(source: str, target: str) -> tuple[str, str]:
    """The tokenizer files of folder `source` copied into `target`, as (data.tokenizer,
    data.tokenizer_path): a tokenizer.json is preferred to a SentencePiece tokenizer.model."""
    names = [name for name in _TOKENIZER_FILES if os.path.exists(os.path.join(source, name))]
    if "tokenizer.json" not in names and "tokenizer.model" not in names:
        return "byte", ""
    os.makedirs(target, exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
    if "tokenizer.json" in names:
        return "huggingface", target
    return "sentencepiece", os.path.join(target, "tokenizer.model")


def import_hf(hf_dir: str, workdir: str) -> str:
    """Writes `workdir` for `train.init_from`: config.json (the model, and the folder's tokenizer,
    copied into workdir/tokenizer), vocabulary.json and a parameters-only checkpoint (a BertModel's
    has no MLM head: a run from it initialises one). Returns the architecture."""
    import jax.numpy as jnp

    from llm_jax import checkpoint, config_lib
    from llm_jax.data import tokenizer as tokenizer_lib

    if config_lib.holds_checkpoints(workdir) or os.path.exists(os.path.join(workdir, config_lib.IMPORT_RECORD)):
        raise ValueError(f"--workdir: {workdir} already holds checkpoints; import into a new workdir")
    model_cfg, params = load_hf(hf_dir)
    architecture = _read_json(os.path.join(hf_dir, CONFIG_FILE))["architectures"][0]
    name, path = _copy_tokenizer(hf_dir, os.path.join(os.path.abspath(workdir), "tokenizer"))
    config = run_config(model_cfg, tokenizer=name, tokenizer_path=path)
    rebuilt = model_lib.TransformerConfig.from_config(config.model, model_cfg.vocab_size, config.data.seq_len)
    for field in ARCH_FIELDS:  # a guard against config fields that from_config reads otherwise
        if getattr(rebuilt, field) != getattr(model_cfg, field):
            raise ValueError(f"config.model would build model.{field}={getattr(rebuilt, field)!r}, the checkpoint "
                             f"has {getattr(model_cfg, field)!r}")
    tokenizer = None if name == "byte" else tokenizer_lib.get_tokenizer(name, path)
    if tokenizer is None:
        print(f"warning: no tokenizer.json or tokenizer.model in {hf_dir}: runs from {workdir} need "
              f"--config.data.tokenizer and --config.data.tokenizer_path", file=sys.stderr)
    elif tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens, the model's embedding only "
                         f"{model_cfg.vocab_size}")
    config_lib.check_or_write_workdir_config(config, workdir, write=True)
    if tokenizer is not None:
        checkpoint.write_vocabulary(workdir, tokenizer_lib.fingerprint(name, path, tokenizer))
    manager = checkpoint.make_manager(workdir, keep=1, items=("state",))
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in traverse_util.flatten_dict(params).items()})
    checkpoint.save(manager, 0, {"params": params}, None)
    manager.close()
    with open(os.path.join(workdir, config_lib.IMPORT_RECORD), "w") as f:
        json.dump({"hf_dir": os.path.abspath(hf_dir), "architecture": architecture, "tokenizer": name}, f, indent=2)
    return architecture


def export_hf(workdir: str, hf_dir: str) -> str:
    """The newest checkpoint of any training workdir as a Hugging Face folder, with its tokenizer's
    files (a byte-level run has none to give). Returns the architecture."""
    import jax

    from llm_jax import train
    from llm_jax.data import tokenizer as tokenizer_lib

    exp, params = train.load_run(workdir)
    tokenizer, data = exp.tokenizer, exp.config.data
    token_ids = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    architecture = save_hf(exp.model_cfg, jax.device_get(params), hf_dir, token_ids=token_ids)
    if data.tokenizer == "huggingface":
        _copy_tokenizer(os.path.dirname(tokenizer_lib.huggingface_tokenizer_file(data.tokenizer_path)), hf_dir)
    elif data.tokenizer == "sentencepiece":
        shutil.copyfile(data.tokenizer_path, os.path.join(hf_dir, "tokenizer.model"))
    return architecture


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_jax.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    into = commands.add_parser("import", help="a Hugging Face model folder -> a workdir for train.init_from")
    out = commands.add_parser("export", help="a workdir's newest checkpoint -> a Hugging Face model folder")
    for command in (into, out):
        command.add_argument("--hf_dir", required=True, help="the Hugging Face folder (config.json + safetensors)")
        command.add_argument("--workdir", required=True, help="the llm_jax workdir")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            architecture = import_hf(args.hf_dir, args.workdir)
            print(f"imported {architecture} from {args.hf_dir} into {args.workdir}; start a run from it:\n  python -m "
                  f"llm_jax.main --config=configs/finetune.py:init_from={args.workdir},task=sft --workdir=<new>")
        else:
            if os.path.isdir(args.hf_dir) and os.listdir(args.hf_dir):
                raise ValueError(f"--hf_dir: {args.hf_dir} is not empty; export into a new folder")
            architecture = export_hf(args.workdir, args.hf_dir)
            print(f"exported {args.workdir} as {architecture} into {args.hf_dir}")
    except (ValueError, OSError) as error:
        if os.environ.get("LLM_JAX_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"error: {(str(error).strip().splitlines() or [type(error).__name__])[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
