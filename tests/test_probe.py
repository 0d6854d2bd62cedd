"""The representation probe (llm_jax/probe.py): labels from `tokenize`, packing, the linear probe
and its baselines, fill-in-the-blank scoring of each model kind, the CLI end to end, bad input."""
import dataclasses
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import linen as nn

from llm_jax import config_lib, probe, train
from llm_jax.data import tokenizer as tokenizer_lib

SNIPPET = 'x = "return"  # return\nreturn x\n'
SPM = os.path.join(os.path.dirname(__file__), "..", "experiments", "representation_probe", "spm_stdlib_2k.model")


def _classes(labels, names="_csm"):
    return "".join(names[label + 1] for label in labels)


def test_labels_come_from_tokenize():
    """The same word is a string, a comment and code in turn; whitespace is unlabelled."""
    assert _classes(probe.char_classes(SNIPPET)) == "c_c_ssssssss__mmmmmmmm_cccccc_c_"
    assert _classes(probe.char_classes(SNIPPET, "fine"), "_ndosm") == "n_o_ssssssss__mmmmmmmm_nnnnnn_n_"
    byte = tokenizer_lib.ByteTokenizer()
    ids = byte.encode(SNIPPET)
    labels = probe.token_labels(probe.char_classes(SNIPPET), probe.token_spans(byte, SNIPPET, ids))
    assert _classes(labels) == "c_c_ssssssss__mmmmmmmm_cccccc_c_"  # one byte, one character here
    assert probe.char_classes("def f(:\n  x\n y") is None  # tokenize rejects it


def test_tokens_spanning_classes_or_part_of_a_character():
    byte = tokenizer_lib.ByteTokenizer()
    text = 's = "é"\n'
    spans = probe.token_spans(byte, text, byte.encode(text))
    assert spans[5].tolist() == spans[6].tolist() == [5, 6]  # both bytes of é share its span
    spm = tokenizer_lib.get_tokenizer("sentencepiece", SPM)
    ids = spm.encode(SNIPPET)
    spans = probe.token_spans(spm, SNIPPET, ids)
    assert spans[0, 0] == 0 and spans[-1, 1] == len(SNIPPET) and np.all(spans[1:, 0] == spans[:-1, 1])
    labels = probe.token_labels(probe.char_classes(SNIPPET), spans)
    for (start, end), label in zip(spans, labels):
        classes = set(probe.char_classes(SNIPPET)[start:end]) - {probe.UNLABELLED}
        assert label == (classes.pop() if len(classes) == 1 else probe.UNLABELLED)


def test_pack_documents_as_training_packs():
    byte = tokenizer_lib.ByteTokenizer()
    rows = probe.pack_documents(byte, ["a=1\n", "(", "b\n"], seq_len=4, classes="coarse")
    assert rows.documents == 2  # "(" does not tokenize
    assert rows.tokens.tolist() == [[ord(c) + 3 for c in "a=1\n"], [byte.eos_id, ord("b") + 3, ord("\n") + 3,
                                                                     byte.eos_id]]
    assert rows.mask.tolist() == [[1] * 4, [1] * 4]
    assert _classes(rows.labels.ravel()) == "ccc__c__"
    assert rows.document.tolist() == [[0, 0, 0, 0], [0, 1, 1, 1]]


class _DropsCarriageReturns(tokenizer_lib.ByteTokenizer):
    def decode(self, ids):
        return super().decode(ids).replace("\r", "")


def test_documents_the_tokenizer_cannot_round_trip_are_left_out():
    lossy = _DropsCarriageReturns()
    with pytest.raises(ValueError, match="does not round-trip"):
        probe.token_spans(lossy, "a = 1\r\n", lossy.encode("a = 1\r\n"))
    assert probe.pack_documents(lossy, ["a = 1\r\n", "b = 2\n"], seq_len=4, classes="coarse").documents == 1


def test_pack_documents_pads_the_last_row():
    rows = probe.pack_documents(tokenizer_lib.ByteTokenizer(), ["x\n"], seq_len=4, classes="coarse")
    assert rows.mask.tolist() == [[1, 1, 1, 0]] and rows.tokens[0, 3] == 0 and rows.document[0, 3] == -1


def test_samples_are_spread_over_documents():
    """A document of 90 tokens and two of 5: a sample of 12 takes 4 of each, not mostly the big one."""
    document = np.repeat([0, 1, 2], [90, 5, 5]).reshape(4, 25)
    rows = probe.Rows(np.ones_like(document), np.ones_like(document), np.zeros_like(document, np.int8), document)
    row, position = probe.spread_sample(rows, np.ones(document.shape, bool), 12, np.random.default_rng(0))
    assert np.bincount(document[row, position]).tolist() == [4, 4, 4]
    row, position = probe.spread_sample(rows, np.ones(document.shape, bool), 30, np.random.default_rng(0))
    assert np.bincount(document[row, position]).tolist() == [20, 5, 5] and len(set(zip(row, position))) == 30


def test_logistic_regression_separates_separable_classes():
    rng = np.random.default_rng(0)
    centres = np.array([[3.0, 0.0], [-3.0, 3.0], [-3.0, -3.0]])
    y = rng.integers(0, 3, size=300)
    x = centres[y] + rng.normal(scale=0.5, size=(300, 2))
    predict = probe.fit_linear_probe(x[:200], y[:200], 3, steps=300)
    assert np.mean(predict(x[200:]) == y[200:]) == 1.0


def test_token_identity_baseline():
    predictions = probe.token_identity(np.array([5, 5, 5, 6]), np.array([0, 0, 1, 2]), np.array([5, 6, 7]), 3)
    assert predictions.tolist() == [0, 2, 0]  # an id never seen gets the majority class


def test_top_k_hits_only_over_allowed_ids():
    scores = np.array([[9.0, 1.0, 3.0, 2.0], [0.0, 1.0, 2.0, 3.0]])
    allowed = np.array([False, True, True, True])  # id 0 is a special
    top1, top2 = probe.top_k_hits(scores, np.array([2, 1]), allowed, k=2)
    assert top1.tolist() == [True, False] and top2.tolist() == [True, False]


# --------------------------------------------------------------------------------------------
# Tiny untrained models of each kind, on a corpus of Python sources
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{flag: probe.Run} of freshly initialised nano models (rows of 8 tokens), in memory: the
    tests share their compiled forwards."""
    from conftest import make_tiny_config
    root = tmp_path_factory.mktemp("probe")
    sources = sorted(pathlib.Path(probe.__file__).parent.glob("*.py"))[:12]
    for i, path in enumerate(sources):
        shutil.copy(path, root / f"{i:02d}.txt")
    out = {}
    for flag, (task, kind) in probe.EXPECTED.items():
        config = make_tiny_config(**{
            "task": task, "model.kind": kind, "model.style": "bert" if flag == "bert" else "gpt2",
            "data.dataset": "files", "data.files": str(root / "*.txt"), "data.tfds_data_dir": str(root / "tfds"),
            "data.validation_fraction": 0.5, "data.seq_len": 8, "model.d_model": 8, "model.n_layers": 1,
            "model.n_heads": 2})
        exp = train.build_experiment(config)
        # Random parameters of the right shapes: shapes by tracing alone, nothing to compile.
        shapes = nn.unbox(jax.eval_shape(exp.model.init, jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
        rng = np.random.default_rng(len(out))
        params = jax.tree.map(lambda leaf: rng.normal(scale=0.3, size=leaf.shape).astype(np.float32), shapes)
        out[flag] = probe.Run(flag, str(root / flag), config, exp, params)
    return out


ROW = np.array([[10, 11, 12, 13, 1, 14, 15, 16]], np.int32)  # EOS (1) at position 4


def _rows(tokens=ROW):
    return probe.Rows(tokens, np.ones_like(tokens), np.zeros_like(tokens, np.int8), np.zeros_like(tokens))


def test_word2vec_fills_in_by_bayes(runs):
    rng = np.random.default_rng(1)
    params = {name: {"embedding": rng.normal(size=(320, 8)).astype(np.float32)}
              for name in ("input_embed", "output_embed")}
    run = dataclasses.replace(runs["word2vec"], params=params)
    run.config.word2vec.window = 2
    log_prior = np.log(rng.dirichlet(np.ones(320)))
    scores = probe.blank_scores(run, _rows(), np.array([0, 0]), np.array([2, 5]), log_prior)
    scores_VxV = params["input_embed"]["embedding"] @ params["output_embed"]["embedding"].T
    log_p = scores_VxV - np.log(np.exp(scores_VxV).sum(axis=1, keepdims=True))  # [centre, context]
    # Blank at 2: contexts at 0, 1, 3 (4 is EOS). Blank at 5: contexts at 6, 7 (EOS cuts 3 and 4 off).
    np.testing.assert_allclose(scores[0], log_prior + log_p[:, [10, 11, 13]].sum(axis=1), rtol=1e-4)
    np.testing.assert_allclose(scores[1], log_prior + log_p[:, [15, 16]].sum(axis=1), rtol=1e-4)


def test_bert_fills_in_at_mask_without_seeing_the_answer(runs):
    run = runs["bert"]
    scores = probe.blank_scores(run, _rows(), np.array([0]), np.array([2]), None)
    masked = ROW.copy()
    masked[0, 2] = run.exp.tokenizer.mask_id
    expected = run.exp.model.apply({"params": run.params}, masked)[0, 2]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-4, atol=1e-5)
    other = ROW.copy()
    other[0, 2] = 99
    np.testing.assert_allclose(probe.blank_scores(run, _rows(other), np.array([0]), np.array([2]), None), scores,
                               rtol=1e-5, atol=1e-6)


def test_gpt_fills_in_from_the_left_context_only(runs):
    run = runs["gpt"]
    scores = probe.blank_scores(run, _rows(), np.array([0]), np.array([2]), None)
    expected = run.exp.model.apply({"params": run.params}, ROW)[0, 1]  # logits at 1 predict position 2
    np.testing.assert_allclose(scores[0], expected, rtol=1e-4, atol=1e-5)
    other = ROW.copy()
    other[0, 2:] = 99
    np.testing.assert_allclose(probe.blank_scores(run, _rows(other), np.array([0]), np.array([2]), None), scores,
                               rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The study end to end, and bad input
# --------------------------------------------------------------------------------------------

def test_cli_end_to_end(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(probe, "load_run", lambda flag, workdir: runs[flag])  # no checkpoints to read
    out = str(tmp_path / "probe.json")
    result = probe.main([f"--{flag}=runs/{flag}" for flag in probe.EXPECTED]
                        + ["--train_tokens=300", "--test_tokens=300", "--blanks=40", "--prior_tokens=2000",
                           f"--out={out}"])
    table = capsys.readouterr().out
    for label in ("majority class", "token identity", "unigram prior", "word2vec", "BERT", "GPT"):
        assert f"| {label} " in table
    with open(out) as f:
        saved = json.load(f)
    assert saved["probe"] == result["probe"] and saved["counts"]["probe_test_tokens"] == 300
    assert saved["counts"]["blanks"] == 40 and set(saved["fill_in"]) == {"unigram prior", *probe.EXPECTED}
    assert all(0.0 <= v <= 1.0 for v in result["probe"].values())
    assert result["probe"]["token identity (fitted on test)"] >= result["probe"]["token identity"]
    assert result["fill_in"]["word2vec"]["top5"] >= result["fill_in"]["word2vec"]["top1"]


def test_a_workdir_of_the_wrong_kind_is_named(runs, tmp_path):
    gpt = str(tmp_path / "gpt")
    config_lib.check_or_write_workdir_config(runs["gpt"].config, gpt, write=True)
    with pytest.raises(ValueError, match=r"^--bert=.*/gpt is a run of task 'lm' \(model.kind 'decoder'\); "
                                         r"--bert needs task 'mlm' \(model.kind 'encoder'\)$"):
        probe.load_run("bert", gpt)
    with pytest.raises(SystemExit, match=r"^error: --word2vec=.*/gpt is a run of task 'lm'"):
        probe.main([f"--word2vec={gpt}", f"--bert={gpt}", f"--gpt={gpt}"])
    with pytest.raises(SystemExit, match=r"^error: --word2vec=.*nowhere: no config.json there; not a training"):
        probe.main([f"--word2vec={tmp_path / 'nowhere'}", f"--bert={gpt}", f"--gpt={gpt}"])


def test_runs_on_other_data_are_refused(runs):
    other = dataclasses.replace(runs["gpt"], config=runs["gpt"].config.copy_and_resolve_references())
    other.config.data.seq_len = 16
    with pytest.raises(ValueError, match=r"--gpt=.*: data.seq_len is 16 but 8 in --word2vec"):
        probe.check_same_data([runs["word2vec"], runs["bert"], other])
