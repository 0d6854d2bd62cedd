"""The config skeleton every job starts from, presets, and validation.

Configs are data: `configs/<job>.py` calls `base_config()`, changes values and returns it. Every
key is declared here, so any of them can be set from the command line with `--config.a.b=value`
and a misspelled key fails loudly. `validate()` checks meaning before anything compiles and
names the offending field.
"""
from __future__ import annotations

import json
import os

import ml_collections
from ml_collections import config_dict

from llm_jax import model as model_lib

# In a workdir written by `python -m llm_jax.convert import`: parameters only, a source for
# train.init_from, never a run to resume (it holds no optimizer state or data position).
IMPORT_RECORD = "hf_import.json"

TASKS = ("lm", "mlm", "sft", "reward", "dpo", "online_dpo", "skipgram")
# The model.kind a task needs; every other task trains a decoder.
TASK_KINDS = {"mlm": "encoder", "skipgram": "word2vec"}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # 'lm' (causal next-token) | 'mlm' (masked LM, encoder) | 'sft' | 'reward' | 'dpo' | 'online_dpo'
    # | 'skipgram' (word2vec)
    c.task = "lm"

    c.model = m = ml_collections.ConfigDict()
    m.kind = "decoder"  # 'decoder' (GPT) | 'encoder' (BERT) | 'word2vec' (skip-gram, d_model wide)
    m.size = "nano"  # a row of model.SIZES; d_model/n_layers/n_heads below override it when > 0
    m.style = "gpt2"  # 'gpt2' | 'llama' | 'bert': defaults for the architectural fields left unset
    m.d_model = 0
    m.n_layers = 0
    m.n_heads = 0
    m.n_kv_heads = 0  # 0 -> n_heads (no grouped-query attention)
    m.head_dim = 0  # 0 -> d_model // n_heads
    m.d_ff = 0  # 0 -> 4 d_model (gelu) or ~8/3 d_model (swiglu)
    m.max_len = 0  # 0 -> data.seq_len
    m.vocab_multiple = 64  # pad the tokenizer's vocabulary up to a multiple of this
    m.vocab_size = 0  # 0 -> the tokenizer's, padded as above; > 0: exactly this many embedding rows
    m.norm = ""  # '' -> style default: 'layernorm' | 'rmsnorm'
    m.norm_eps = 0.0  # 0 -> style default
    m.mlp = ""  # 'gelu' | 'swiglu'
    m.gelu_approximate = False  # GELU's tanh approximation (GPT-2 checkpoints' "gelu_new"), else erf
    m.positions = ""  # 'learned' | 'rope'
    m.rope_theta = 10_000.0
    m.tie_embeddings = config_dict.placeholder(bool)  # None -> style default
    m.use_bias = config_dict.placeholder(bool)
    m.norm_position = ""  # 'pre' | 'post'
    m.embed_norm = config_dict.placeholder(bool)
    m.type_vocab_size = -1  # -1 -> style default (BERT: 2); 0 = no token types
    m.mlm_head_transform = config_dict.placeholder(bool)
    m.dropout = 0.0
    m.attention_impl = "einsum"  # 'einsum' | 'xla' | 'cudnn' (jax.nn.dot_product_attention)
    # einsum attention of decoders: queries in blocks of this many, each scored only against the
    # keys it may see (skips the causal mask's upper triangle); 0 = all at once
    m.attention_block = 128
    m.remat = "none"  # 'none' | 'full' | 'dots': rematerialise each block in the backward pass
    m.dtype = "float32"  # compute dtype ('bfloat16' on TPU/GPU)
    m.param_dtype = "float32"

    c.data = d = ml_collections.ConfigDict()
    d.dataset = "stdlib"  # 'stdlib' | 'files' | a TFDS catalogue name (e.g. 'lm1b')
    d.files = ""  # comma-separated paths or globs, for dataset='files'
    d.tfds_data_dir = ""  # '' -> $TFDS_DATA_DIR or ~/tensorflow_datasets
    d.text_key = "text"
    d.train_split = "train"
    d.eval_split = "validation"
    d.validation_fraction = 0.02
    d.max_documents = 0  # 0 = all documents
    d.tokenizer = "byte"  # 'byte' | 'sentencepiece' | 'huggingface'
    d.tokenizer_path = ""  # sentencepiece: a .model file; huggingface: a tokenizer.json or the folder holding it
    d.seq_len = 256
    d.batch_size = 16  # global batch (sequences; pairs for dpo; prompts for reward), all processes
    # Post-training data (sft, reward, dpo): JSONL files in TRL's formats, or, when train_file is
    # empty, the embedded verifiable tasks (data/tasks.py) with a simulated annotator.
    d.train_file = ""
    d.eval_file = ""
    d.tasks = "add,sort,reverse,count"
    d.num_examples = 20_000  # generated training examples (prompts) when train_file is empty
    d.num_eval_examples = 256
    d.annotator_noise = 0.5  # Gumbel noise scale of the simulated rater (0 = ranks by gold reward)
    d.truncation = "keep_end"  # 'keep_end' | 'keep_start' | 'drop', for examples over seq_len
    d.pack = False  # sft: several examples per row (no attention across them)
    d.max_responses = 4  # reward: K, the most answers ranked per prompt
    d.shuffle = True
    d.prefetch = 2

    c.optimizer = o = ml_collections.ConfigDict()
    o.learning_rate = 3e-4
    o.schedule = "cosine"  # 'cosine' | 'linear' | 'constant', all after a linear warmup
    o.warmup_steps = 100
    o.decay_steps = 0  # 0 -> train.num_steps
    o.min_lr_ratio = 0.1
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1
    o.decay_embeddings = False
    o.decay_norms_and_biases = False
    o.grad_clip_norm = 1.0
    o.grad_accum_steps = 1  # micro-batches per step (the batch is split, gradients summed)
    o.z_loss = 0.0  # PaLM's z-loss weight on logsumexp^2
    # > 0: a step whose gradients hold NaN/Inf leaves the parameters and optimizer state as they
    # were (optax.apply_if_finite), up to this many in a row; 0: the run stops at the first one
    o.skip_nonfinite_steps = 0

    c.train = t = ml_collections.ConfigDict()
    t.num_steps = 1000
    t.log_every = 10
    t.eval_every = 200
    t.eval_batches = 8  # 0 = the whole held-out split
    t.checkpoint_every = 200
    t.keep_checkpoints = 3
    t.init_from = ""  # a workdir (its newest checkpoint) or step folder to take parameters from
    t.peak_flops_per_device = 0.0  # 0 -> look up the device kind, or measure on CPU
    t.progress = True  # live progress line on the terminal
    # a logged train loss above this many times the running mean of the logged losses is reported
    # (stderr and `train/loss_spike` in metrics.jsonl); 0 = off
    t.loss_spike_factor = 2.0

    c.word2vec = ml_collections.ConfigDict()
    c.word2vec.window = 5  # task 'skipgram': neighbours predicted on each side of a token

    c.reward = ml_collections.ConfigDict()
    c.reward.margin = 0.0  # Bradley-Terry margin: -log sigmoid(r_chosen - r_rejected - margin)

    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 0.1
    c.dpo.loss_type = "sigmoid"  # 'sigmoid' (DPO) | 'ipo'
    c.dpo.label_smoothing = 0.0  # conservative DPO
    c.dpo.reference = "cached"  # 'cached' (log-probs computed once) | 'online' (frozen model run each step)
    c.dpo.reference_from = ""  # '' -> train.init_from (the SFT model)
    c.dpo.reference_free = False
    c.dpo.rpo_alpha = 0.0  # RPO: + alpha * NLL of the chosen response per token (TRL's rpo_alpha)
    c.dpo.pairs = "best_worst"  # from rankings: 'best_worst' | 'all' ordered pairs

    c.online_dpo = od = ml_collections.ConfigDict()
    od.steps_per_iteration = 8  # DPO steps on each iteration's fresh pairs; train.num_steps counts them all
    od.prompts_per_iteration = 32
    od.samples_per_prompt = 4  # K answers sampled per prompt
    od.max_new_tokens = 24
    od.temperature = 1.0
    od.pairs = "best_worst"  # 'best_worst' | 'all' pairs whose scores differ
    od.scorer = "reward_model"  # 'reward_model' | 'gold' (the oracle itself)
    od.reward_model_from = ""  # the reward model's workdir
    od.reference_update_every = 0  # iterations; 0 keeps the SFT reference throughout

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 -> all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    # Multi-host: one process per host (TPU VM) or per GPU node. On TPU VMs and SLURM/Open MPI
    # clusters jax.distributed.initialize() finds everything by itself; elsewhere set the three
    # fields below (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = False
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    return c


def apply_presets(config: ml_collections.ConfigDict, arg: str | None, presets: dict) -> ml_collections.ConfigDict:
    """Applies `key=value` pairs from the config argument, e.g. `configs/quickstart.py:size=tiny`.

    `presets` maps a key to a function (config, value) -> None; unknown keys are an error.
    """
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in presets:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(presets)}")
        presets[key](config, value)
    return config


def set_fields(config, fields: dict):
    """Sets dotted keys, `{"optimizer.learning_rate": 1e-3}`, as `--config.a.b=value` would."""
    for key, value in fields.items():
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def set_size(config, size: str) -> None:
    if size not in model_lib.SIZES:
        raise ValueError(f"size must be one of {sorted(model_lib.SIZES)}, got {size!r}")
    config.model.size = size


def set_steps(config, steps: str) -> None:
    """A shorter or longer run; the warmup shrinks with it (to at most a tenth of the run), since
    a schedule cannot decay before its warmup ends."""
    config.train.num_steps = int(steps)
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, int(steps) // 10)
    for every in ("eval_every", "checkpoint_every"):
        config.train[every] = min(config.train[every], int(steps))


# Config arguments every job accepts: `configs/<job>.py:size=mini,steps=2000`.
COMMON_PRESETS = {"size": set_size, "steps": set_steps}


def validate(config, *, num_devices: int, process_count: int = 1) -> None:
    """Semantic checks that need no compilation; each error names the field."""
    from llm_jax import sharding  # local: keep config parsing free of device state

    if config.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {config.task!r}")
    kind = TASK_KINDS.get(config.task, "decoder")
    if config.model.kind != kind:
        why = " (an encoder sees the future)" if config.model.kind == "encoder" else ""
        raise ValueError(f"task={config.task!r} needs model.kind={kind!r}{why}")
    if config.task == "skipgram" and config.word2vec.window < 1:
        raise ValueError(f"word2vec.window must be >= 1, got {config.word2vec.window}")
    if config.task in ("sft", "reward", "dpo") and config.data.truncation not in ("keep_end", "keep_start", "drop"):
        raise ValueError(f"data.truncation must be 'keep_end', 'keep_start' or 'drop', got {config.data.truncation!r}")
    if config.task == "online_dpo" and config.online_dpo.pairs not in ("best_worst", "all"):
        raise ValueError(f"online_dpo.pairs must be 'best_worst' or 'all', got {config.online_dpo.pairs!r}")
    if config.task in ("dpo", "online_dpo"):
        if config.dpo.rpo_alpha < 0:
            raise ValueError(f"dpo.rpo_alpha must be >= 0, got {config.dpo.rpo_alpha}")
        if config.dpo.beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {config.dpo.beta}")
        if config.dpo.reference not in ("cached", "online"):
            raise ValueError(f"dpo.reference must be 'cached' or 'online', got {config.dpo.reference!r}")
        if config.dpo.pairs not in ("best_worst", "all"):
            raise ValueError(f"dpo.pairs must be 'best_worst' or 'all', got {config.dpo.pairs!r}")
        if config.dpo.loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"dpo.loss_type must be 'sigmoid' or 'ipo', got {config.dpo.loss_type!r}")
        if not 0.0 <= config.dpo.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {config.dpo.label_smoothing}")
        if not (config.dpo.reference_free or config.dpo.reference_from or config.train.init_from):
            raise ValueError("dpo.reference_from (or train.init_from) must name the reference model's "
                             "workdir, unless dpo.reference_free=True")
    if config.task == "online_dpo":
        od = config.online_dpo
        for field, value, least in [("steps_per_iteration", od.steps_per_iteration, 1),
                                    ("prompts_per_iteration", od.prompts_per_iteration, 1),
                                    ("samples_per_prompt", od.samples_per_prompt, 2),
                                    ("max_new_tokens", od.max_new_tokens, 1),
                                    ("reference_update_every", od.reference_update_every, 0)]:
            if value < least:
                raise ValueError(f"online_dpo.{field} must be >= {least}, got {value}")
        if not od.temperature > 0:
            raise ValueError(f"online_dpo.temperature must be > 0, got {od.temperature}")
    d, t, o = config.data, config.train, config.optimizer
    if config.task == "reward" and d.max_responses < 2:
        raise ValueError(f"data.max_responses must be >= 2 (a ranking needs two answers), got {d.max_responses}")
    if config.task in ("sft", "reward", "dpo", "online_dpo") and not d.train_file:
        for field, value in [("data.num_examples", d.num_examples), ("data.num_eval_examples", d.num_eval_examples)]:
            if value < 1:
                raise ValueError(f"{field} must be >= 1, got {value}")
        if d.annotator_noise < 0:
            raise ValueError(f"data.annotator_noise must be >= 0, got {d.annotator_noise}")
    for field, value in [("data.max_documents", d.max_documents), ("data.prefetch", d.prefetch),
                         ("train.peak_flops_per_device", t.peak_flops_per_device)]:
        if value < 0:
            raise ValueError(f"{field} must be >= 0, got {value}")
    for field, value in [("data.seq_len", d.seq_len), ("data.batch_size", d.batch_size),
                         ("train.num_steps", t.num_steps), ("train.log_every", t.log_every),
                         ("train.eval_every", t.eval_every), ("train.checkpoint_every", t.checkpoint_every),
                         ("train.keep_checkpoints", t.keep_checkpoints),
                         ("optimizer.grad_accum_steps", o.grad_accum_steps)]:
        if value < 1:
            raise ValueError(f"{field} must be >= 1, got {value}")
    if t.eval_batches < 0:
        raise ValueError(f"train.eval_batches must be >= 0, got {t.eval_batches}")
    if not 0.0 < d.validation_fraction < 1.0:
        raise ValueError(f"data.validation_fraction must be in (0, 1), got {d.validation_fraction}")

    shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
    dp = shape["data"] * shape["fsdp"]
    if d.batch_size % dp:
        raise ValueError(f"data.batch_size ({d.batch_size}) must be divisible by the data-parallel "
                         f"degree mesh.data*mesh.fsdp = {dp}")
    if d.batch_size % process_count:
        raise ValueError(f"data.batch_size ({d.batch_size}) must be divisible by the number of "
                         f"processes ({process_count})")
    if (d.batch_size // dp) % o.grad_accum_steps:
        raise ValueError(f"data.batch_size per data-parallel shard ({d.batch_size // dp}) must be "
                         f"divisible by optimizer.grad_accum_steps ({o.grad_accum_steps})")

    if config.model.vocab_size < 0:
        raise ValueError(f"model.vocab_size must be >= 0 (0 = the tokenizer's), got {config.model.vocab_size}")
    # The tokenizer is not loaded yet: a byte-sized stand-in checks divisibility; train.py re-checks.
    model_cfg = model_lib.TransformerConfig.from_config(config.model, vocab_size=min(256, config.model.vocab_size or 256),
                                                        seq_len=d.seq_len)
    if d.seq_len > model_cfg.max_len:
        raise ValueError(f"data.seq_len ({d.seq_len}) exceeds model.max_len ({model_cfg.max_len})")
    tensor = shape["tensor"]
    for field in ("n_heads", "n_kv_heads", "d_ff"):
        if getattr(model_cfg, field) % tensor:
            raise ValueError(f"model.{field} ({getattr(model_cfg, field)}) must be divisible by mesh.tensor ({tensor})")
    if model_cfg.vocab_size % tensor:
        raise ValueError(f"model.vocab_size / model.vocab_multiple must make the vocabulary ({model_cfg.vocab_size}) "
                         f"divisible by mesh.tensor ({tensor})")
    if model_cfg.d_model % shape["fsdp"]:
        raise ValueError(f"model.d_model ({model_cfg.d_model}) must be divisible by mesh.fsdp ({shape['fsdp']})")


# Fields that may differ between a run and its restart without making it another run.
_RESTART_SAFE = {"train.num_steps", "train.log_every", "train.eval_every", "train.eval_batches",
                 "train.checkpoint_every", "train.keep_checkpoints", "train.progress",
                 "train.peak_flops_per_device", "data.prefetch", "distributed.initialize",
                 "distributed.coordinator_address", "distributed.num_processes", "distributed.process_id",
                 "data.tfds_data_dir"}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def check_or_write_workdir_config(config, workdir: str, *, write: bool) -> None:
    """Refuses a workdir whose checkpoints belong to a run of a different config, naming the fields
    that differ; writes config.json otherwise. A workdir without checkpoints has nothing to resume,
    so a run that failed before its first save (a typo in a path, say) does not lock it. Keys added
    to `base_config()` since the run was written count as their defaults and keys since removed
    are ignored, as `train.load_config` reads them."""
    if os.path.exists(os.path.join(workdir, IMPORT_RECORD)):
        raise ValueError(f"workdir {workdir} holds weights imported by `llm_jax.convert import` (parameters only, "
                         f"nothing to resume): start a run from them with --config.train.init_from={workdir} and "
                         f"another --workdir")
    path = os.path.join(workdir, "config.json")
    new = json.loads(config.to_json())
    if holds_checkpoints(workdir):
        if not os.path.exists(path):
            raise ValueError(f"workdir {workdir} holds checkpoints but no config.json: a run of an unknown "
                             f"config; use another --workdir")
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:  # ValueError: invalid JSON or UTF-8
            raise ValueError(f"{path} is unreadable or not valid JSON ({e}); move it away or use another "
                             f"--workdir") from e
        if not isinstance(old, dict):
            raise ValueError(f"{path} holds no config (a JSON object); move it away or use another --workdir")
        new_flat = _flatten(new)
        old_flat = {**_flatten(json.loads(base_config().to_json())), **_flatten(old)}
        changed = sorted(k for k in new_flat if k not in _RESTART_SAFE and old_flat.get(k) != new_flat[k])
        if changed:
            shown = "; ".join(f"{k} was {old_flat.get(k)!r}, now {new_flat[k]!r}" for k in changed[:3])
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            raise ValueError(f"workdir {workdir} holds checkpoints of a run with a different config ({shown}{more}); "
                             f"use another --workdir, or the run's own config")
    if write:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(new, f, indent=2, sort_keys=True)
        os.replace(tmp, path)


def holds_checkpoints(workdir: str) -> bool:
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))
