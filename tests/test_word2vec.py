"""The skip-gram model and objective (llm_jax/word2vec.py) and its task in the one training loop."""
import functools
import math
import os

import jax
import numpy as np
import pytest
from flax import linen as nn

from llm_jax import config_lib, metrics, scaling, train, word2vec
from llm_jax import model as model_lib

EOS, PAD = 1, 0
# Two documents in one packed row (EOS between), then padding.
TOKENS = np.array([[4, 5, EOS, 6, 7, PAD]], np.int32)
MASK = np.array([[1, 1, 1, 1, 1, 0]], np.int32)
# The pairs that count at window 2, worked out by hand: only neighbours inside one document.
PAIRS = [(0, 1), (1, 0), (3, 4), (4, 3)]  # (centre position, context position)


def w2v_config(vocab_size=8, d_model=3):
    config = config_lib.base_config()
    config.task, config.model.kind = "skipgram", "word2vec"
    config.model.d_model, config.model.vocab_size = d_model, vocab_size
    return train.model_config(config, vocab_size)


def test_context_targets_respect_padding_and_document_ends():
    assert word2vec.offsets(2).tolist() == [-2, -1, 1, 2]
    targets, weights = word2vec.context_targets(TOKENS, MASK, window=2, eos_id=EOS)
    offsets = word2vec.offsets(2)
    counted = sorted((i, i + offsets[o]) for i, o in zip(*np.nonzero(np.asarray(weights[0]))))
    assert counted == PAIRS
    for i, j in PAIRS:
        assert targets[0, i, list(offsets).index(j - i)] == TOKENS[0, j]


def test_skipgram_loss_matches_numpy():
    cfg = w2v_config()
    rng = np.random.default_rng(0)
    input_VxD, output_VxD = rng.normal(size=(2, 8, 3)).astype(np.float32)
    params = {"input_embed": {"embedding": input_VxD}, "output_embed": {"embedding": output_VxD}}
    logits = word2vec.SkipGram(cfg).apply({"params": params}, TOKENS)
    targets, weights = word2vec.context_targets(TOKENS, MASK, window=2, eos_id=EOS)
    sums = word2vec.skipgram_sums(logits, targets, weights, z_loss_weight=0.1)

    scores_VxV = input_VxD @ output_VxD.T  # [centre token, context token]
    log_probs = scores_VxV - np.log(np.exp(scores_VxV).sum(axis=1, keepdims=True))
    tokens = TOKENS[0]
    expected = -sum(log_probs[tokens[i], tokens[j]] for i, j in PAIRS)
    log_z = np.log(np.exp(scores_VxV).sum(axis=1))
    np.testing.assert_allclose(sums["loss_sum"], expected, rtol=1e-5)
    np.testing.assert_allclose(sums["z_loss_sum"], 0.1 * sum(log_z[tokens[i]] ** 2 for i, _ in PAIRS), rtol=1e-5)
    assert sums["weight_sum"] == 4
    hits = sum(np.argmax(scores_VxV[tokens[i]]) == tokens[j] for i, j in PAIRS)
    assert sums["correct_sum"] == hits


def test_fresh_model_predicts_uniformly():
    """word2vec's zero output vectors: every pair costs log V at the start."""
    cfg = w2v_config()
    params = word2vec.SkipGram(cfg).init(jax.random.key(0), TOKENS)["params"]
    logits = word2vec.SkipGram(cfg).apply({"params": nn.unbox(params)}, TOKENS)
    sums = word2vec.skipgram_sums(logits, *word2vec.context_targets(TOKENS, MASK, window=2, eos_id=EOS))
    np.testing.assert_allclose(sums["loss_sum"], 4 * math.log(8), rtol=1e-6)


def test_counts_and_flops_are_those_of_two_tables():
    cfg = w2v_config(vocab_size=64, d_model=16)
    assert (cfg.n_layers, cfg.tie_embeddings) == (0, False)
    assert scaling.count_params(cfg) == {"total": 2 * 64 * 16, "embedding": 2 * 64 * 16, "non_embedding": 0}
    assert metrics.flops_per_token(cfg, 128) == 6 * 64 * 16  # the softmax over the vocabulary, no attention


def test_parameters_shard_like_the_transformers_embeddings():
    config = config_lib.base_config()
    config.task, config.model.kind, config.model.d_model = "skipgram", "word2vec", 16
    config.mesh.fsdp, config.mesh.tensor = 2, 2
    exp = train.build_experiment(config)
    abstract = train.state_shardings_and_init(exp, 0)[0]
    for name in ("input_embed", "output_embed"):
        assert abstract.params[name]["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    boxed = model_lib.init_params_shape(exp.model_cfg)["params"]
    assert nn.get_partition_spec(boxed)["output_embed"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")


@pytest.mark.parametrize("fields, message", [
    ({"task": "skipgram"}, "task='skipgram' needs model.kind='word2vec'"),
    ({"model.kind": "word2vec"}, "task='lm' needs model.kind='decoder'"),
    ({"task": "skipgram", "model.kind": "word2vec", "word2vec.window": 0}, "word2vec.window must be >= 1"),
])
def test_bad_configs_name_the_field(fields, message):
    config = config_lib.set_fields(config_lib.base_config(), fields)
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config, num_devices=8)


def test_loop_trains_logs_and_checkpoints(tiny_config, text_corpus, tmp_path):
    """The one loop trains the skip-gram; its exact resume is in tests/test_resume_every_task.py."""
    config = tiny_config(**{"data.dataset": "files", "data.files": text_corpus,
                            "data.tfds_data_dir": str(tmp_path / "tfds"), "data.validation_fraction": 0.2,
                            "task": "skipgram", "model.kind": "word2vec", "word2vec.window": 3,
                            "train.num_steps": 4, "train.eval_every": 2, "train.checkpoint_every": 2})
    workdir = str(tmp_path / "run")
    last = train.run(config, workdir)
    assert last["eval/loss"] < math.log(320)  # below uniform over the byte vocabulary's 320 rows
    rows = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert rows[0]["eval/unigram_baseline"] > 0
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


@pytest.mark.parametrize("scale", ["smoke", "cpu", "tpu"])
def test_study_runs_share_data_tokenizer_budget_and_width(scale):
    from llm_jax import sweep
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "representation_probe", "sweep.py")
    _, runs = sweep.load(f"{path}:scale={scale}")
    configs = {run.name: run.resolved for run in runs}
    assert {name: (c.task, c.model.kind) for name, c in configs.items()} == {
        "word2vec": ("skipgram", "word2vec"), "bert": ("mlm", "encoder"), "gpt": ("lm", "decoder")}
    for field in ("data.dataset", "data.tokenizer_path", "data.seq_len", "data.batch_size", "train.num_steps",
                  "model.d_model"):
        assert len({functools.reduce(getattr, field.split("."), c) for c in configs.values()}) == 1, field
    assert (configs["bert"].model.n_layers, configs["bert"].model.n_heads) == \
        (configs["gpt"].model.n_layers, configs["gpt"].model.n_heads)
