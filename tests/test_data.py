"""Corpora (TFDS builders read without TensorFlow) and Grain pipelines: packing, shuffling,
sharding, resumable state, eval batches, the unigram baseline."""
import json
import math
import os
import subprocess
import sys
import sysconfig

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from llm_jax.data import corpora, pipeline
from llm_jax.data.tokenizer import ByteTokenizer
from conftest import assert_same_batches, take

TOKENIZER = ByteTokenizer()


def make_data_cfg(tmp_path, **overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(
        dataset="files", files="", tfds_data_dir=str(tmp_path / "tfds"), text_key="text",
        train_split="train", eval_split="validation", validation_fraction=0.25, max_documents=0,
        tokenizer="byte", tokenizer_path="", seq_len=16, shuffle=True, prefetch=2,
    ))
    cfg.update(overrides)
    return cfg


def write_corpus(tmp_path, texts, name="corpus") -> str:
    """Writes doc000.txt, doc001.txt, ... (sorted = given order); returns their glob."""
    directory = tmp_path / name
    directory.mkdir()
    for i, text in enumerate(texts):
        (directory / f"doc{i:03d}.txt").write_text(text)
    return str(directory / "*.txt")


def read_split(cfg, split):
    source = corpora.load_split(cfg, split)
    return [source[i] for i in range(len(source))]


def letter_documents(num_documents, length=lambda i: 20 + 7 * i):
    """Document i is one distinct letter repeated: its tokens tell which document they came from."""
    return [chr(ord("A") + i) * length(i) for i in range(num_documents)]




# --- corpora -------------------------------------------------------------------------------


def test_validation_positions_are_spread_evenly():
    assert corpora.validation_positions(9, 0.25) == [True, False, False, False, True, False, False, False, True]
    assert sum(corpora.validation_positions(100, 0.02)) == 2  # every 50th: positions 0 and 50
    assert sum(corpora.validation_positions(10, 0.02)) == 1  # a small corpus still has one


def test_stdlib_fixed_order_and_disjoint_splits(tmp_path):
    cfg = make_data_cfg(tmp_path, dataset="stdlib", max_documents=12)
    config = corpora.stdlib_config(cfg)
    assert len(config.paths) == 12 and list(config.paths) == sorted(config.paths)
    assert all(p.endswith(".py") and "site-packages" not in p for p in config.paths)
    assert config.root == sysconfig.get_paths()["stdlib"]
    texts = [open(os.path.join(config.root, p), "rb").read().decode("utf-8", "replace") for p in config.paths]

    train, validation = read_split(cfg, "train"), read_split(cfg, "validation")
    assert validation == texts[0::4]  # positions 0, 4, 8 for validation_fraction=0.25
    assert train == [t for i, t in enumerate(texts) if i % 4]


def test_stdlib_identity_depends_on_python_and_sizes(tmp_path):
    cfg = make_data_cfg(tmp_path, dataset="stdlib", max_documents=12)
    name = corpora.stdlib_config(cfg).name
    assert name.startswith("stdlib_py" + sys.version.split()[0].replace(".", "_"))
    assert corpora.stdlib_config(make_data_cfg(tmp_path, dataset="stdlib", max_documents=13)).name != name
    cfg.validation_fraction = 0.5
    assert corpora.stdlib_config(cfg).name != name


def test_files_corpus_order_splits_and_no_stale_cache(tmp_path):
    pattern = write_corpus(tmp_path, ["zero", "one", "", "three", "four"])  # the empty file is left out
    cfg = make_data_cfg(tmp_path, files=pattern, validation_fraction=0.5)
    assert read_split(cfg, "validation") == ["zero", "three"]
    assert read_split(cfg, "train") == ["one", "four"]

    os.utime(tmp_path / "corpus" / "doc001.txt", ns=(0, 0))  # same size, another mtime
    (tmp_path / "corpus" / "doc004.txt").write_text("four, edited")
    assert read_split(cfg, "train") == ["one", "four, edited"]
    cfg.max_documents = 2
    assert read_split(cfg, "train") == ["one"]


def test_files_corpus_errors_name_the_field_and_path(tmp_path):
    with pytest.raises(ValueError, match=r"data\.files: '.*nothing-\*\.txt' matches no file"):
        corpora.load_split(make_data_cfg(tmp_path, files=str(tmp_path / "nothing-*.txt")), "train")
    with pytest.raises(ValueError, match=r"data\.files: cannot read '.*missing\.txt'"):
        corpora.load_split(make_data_cfg(tmp_path, files=str(tmp_path / "missing.txt")), "train")
    pattern = write_corpus(tmp_path, ["", ""])
    with pytest.raises(ValueError, match=r"data\.files=.* holds no text"):
        corpora.load_split(make_data_cfg(tmp_path, files=pattern), "train")
    with pytest.raises(ValueError, match=r"data\.validation_fraction=0\.5 holds out all 1 documents"):
        corpora.load_split(make_data_cfg(tmp_path, files=write_corpus(tmp_path, ["x"], "one"),
                                         validation_fraction=0.5), "train")


def test_unknown_split_and_catalogue_errors(tmp_path):
    cfg = make_data_cfg(tmp_path, files=write_corpus(tmp_path, ["a", "b", "c", "d"]))
    with pytest.raises(ValueError, match=r"no split 'test'.*\['train', 'validation'\]"):
        corpora.load_split(cfg, "test")
    with pytest.raises(ValueError, match=r"data\.dataset='no_such_corpus' is not"):
        corpora.load_split(make_data_cfg(tmp_path, dataset="no_such_corpus"), "train")
    with pytest.raises(FileNotFoundError, match=r"data\.dataset='lm1b' is not prepared .*tfds build lm1b"):
        corpora.load_split(make_data_cfg(tmp_path, dataset="lm1b"), "train")


class TinyCatalogue(tfds.core.GeneratorBasedBuilder):
    """Stands in for a catalogue dataset (lm1b, ...) prepared elsewhere in array_record."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # See corpora.TextFiles.

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"sentence": tfds.features.Text(), "id": np.int64}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(3), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"sentence": f"sentence {i} of {n}", "id": i}


def test_catalogue_dataset_reads_text_key(tmp_path):
    cfg = make_data_cfg(tmp_path, dataset="tiny_catalogue", text_key="sentence")
    TinyCatalogue(data_dir=cfg.tfds_data_dir, file_format="array_record").download_and_prepare()
    assert read_split(cfg, "test") == ["sentence 0 of 2", "sentence 1 of 2"]
    cfg.max_documents = 2
    assert read_split(cfg, "train") == ["sentence 0 of 3", "sentence 1 of 3"]
    cfg.text_key = "text"
    with pytest.raises(ValueError, match=r"data\.text_key='text' is not a feature .*'sentence'"):
        corpora.load_split(cfg, "train")


def test_two_processes_prepare_once_and_read_the_same(tmp_path):
    cfg = make_data_cfg(tmp_path, files=write_corpus(tmp_path, [f"document {i}" for i in range(20)]))
    script = (
        "import json, sys, ml_collections; from llm_jax.data import corpora; "
        "cfg = ml_collections.ConfigDict(json.loads(sys.argv[1])); "
        "src = corpora.load_split(cfg, 'train'); print(json.dumps([src[i] for i in range(len(src))]))"
    )
    processes = [subprocess.Popen([sys.executable, "-c", script, cfg.to_json()], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    texts = [json.loads(out.splitlines()[-1]) for out, _ in outputs]  # TFDS prints to stdout too
    assert texts[0] == texts[1] == read_split(cfg, "train")
    assert "".join(out for out, _ in outputs).count("downloaded and prepared to") == 1


# --- train pipeline ------------------------------------------------------------------------


def test_packing_concatenates_documents_and_eos(tmp_path):
    texts = ["short", "a somewhat longer document, over one row", "x", "tail doc"]
    cfg = make_data_cfg(tmp_path, files=write_corpus(tmp_path, texts), validation_fraction=0.25, shuffle=False)
    train_texts = read_split(cfg, "train")
    stream = np.concatenate([pipeline.encode_document(TOKENIZER, t) for t in train_texts])
    epoch_tokens = len(stream)
    batches = take(pipeline.make_train_iterator(cfg, TOKENIZER, global_batch_size=2, seed=0), 10)
    tokens = np.concatenate([b["tokens"].reshape(-1) for b in batches])
    assert all(b["tokens"].shape == b["mask"].shape == (2, 16) and b["tokens"].dtype == np.int32 for b in batches)
    assert all((b["mask"] == 1).all() for b in batches)
    repeats = np.tile(stream, math.ceil(len(tokens) / epoch_tokens))[: len(tokens)]
    np.testing.assert_array_equal(tokens, repeats)  # no shuffle: the same order every epoch


def test_same_seed_same_batches_other_seed_other_batches(tmp_path):
    cfg = make_data_cfg(tmp_path, files=write_corpus(tmp_path, letter_documents(20)))

    def first_batches(seed):
        return take(pipeline.make_train_iterator(cfg, TOKENIZER, global_batch_size=4, seed=seed), 12)

    assert_same_batches(first_batches(1), first_batches(1))
    assert not np.array_equal(first_batches(1)[0]["tokens"], first_batches(2)[0]["tokens"])


def test_each_epoch_has_a_new_order(tmp_path):
    texts = letter_documents(12, length=lambda i: 15)  # 16 tokens with eos: one document per row
    cfg = make_data_cfg(tmp_path, files=write_corpus(tmp_path, texts), validation_fraction=0.1)
    num_train = len(read_split(cfg, "train"))
    rows = np.concatenate([b["tokens"] for b in
                           take(pipeline.make_train_iterator(cfg, TOKENIZER, global_batch_size=1, seed=0), 3 * num_train)])
    epochs = rows[:, 0].reshape(3, num_train)  # each row's letter names its document
    assert all(sorted(epoch) == sorted(epochs[0]) for epoch in epochs)  # every document once per epoch
    assert len({tuple(epoch) for epoch in epochs}) == 3


@pytest.mark.parametrize("prefetch", [0, 2])
def test_set_state_resumes_exactly_mid_epoch_and_across_epochs(tmp_path, prefetch):
    cfg = make_data_cfg(tmp_path, files=write_corpus(tmp_path, letter_documents(9)), prefetch=prefetch)
    epoch_tokens = sum(len(t) + 1 for t in read_split(cfg, "train"))
    batch_tokens = 3 * cfg.seq_len
    num_batches = 3 * epoch_tokens // batch_tokens  # three epochs
    reference = pipeline.make_train_iterator(cfg, TOKENIZER, global_batch_size=3, seed=5)
    batches, states = [], []
    for _ in range(num_batches):
        batches.append(next(reference))
        states.append(json.loads(json.dumps(reference.get_state())))  # as a checkpoint stores it
    first_epoch_end = epoch_tokens // batch_tokens
    cfg.prefetch = 2 - prefetch  # data.prefetch may change across a restart
    for step in (2, first_epoch_end - 1, first_epoch_end, first_epoch_end + 1, num_batches - 6):
        resumed = pipeline.make_train_iterator(cfg, TOKENIZER, global_batch_size=3, seed=5)
        resumed.set_state(states[step])
        assert_same_batches(take(resumed, 5), batches[step + 1 : step + 6])


def test_processes_get_disjoint_documents_and_local_batches(tmp_path):
    cfg = make_data_cfg(tmp_path, files=write_corpus(tmp_path, letter_documents(16)))
    letters = []
    for process_index in range(2):
        iterator = pipeline.make_train_iterator(cfg, TOKENIZER, global_batch_size=4, seed=0,
                                                process_index=process_index, process_count=2)
        batches = take(iterator, 20)
        assert batches[0]["tokens"].shape == (2, 16)
        tokens = np.concatenate([b["tokens"].reshape(-1) for b in batches])
        letters.append(set(tokens[tokens >= TOKENIZER.num_special].tolist()))
    assert letters[0] and letters[1] and not letters[0] & letters[1]
    with pytest.raises(ValueError, match=r"data\.batch_size \(5\) must be divisible by the number of processes \(2\)"):
        pipeline.make_train_iterator(cfg, TOKENIZER, global_batch_size=5, seed=0, process_count=2)


# --- eval batches and the unigram baseline --------------------------------------------------


def test_eval_batches_cover_the_split_once_with_masked_padding(tmp_path):
    texts = [f"validation document number {i}" for i in range(4)] * 3
    cfg = make_data_cfg(tmp_path, files=write_corpus(tmp_path, texts), validation_fraction=0.5)
    batches = pipeline.make_eval_batches(cfg, TOKENIZER, global_batch_size=4, num_batches=0)
    assert all(b["tokens"].shape == (4, 16) for b in batches)
    tokens = np.concatenate([b["tokens"].reshape(-1) for b in batches])
    mask = np.concatenate([b["mask"].reshape(-1) for b in batches])
    expected = np.concatenate([pipeline.encode_document(TOKENIZER, t) for t in read_split(cfg, "validation")])
    np.testing.assert_array_equal(tokens[mask == 1], expected)
    assert mask[: len(expected)].all() and not mask[len(expected):].any()
    assert (tokens[mask == 0] == TOKENIZER.pad_id).all()
    assert len(batches) == math.ceil(len(expected) / (4 * 16))
    assert not batches[-1]["mask"][-1].any(), "the last batch should end with a padding row"

    assert_same_batches(batches, pipeline.make_eval_batches(cfg, TOKENIZER, global_batch_size=4, num_batches=0))
    assert_same_batches(batches[:2], pipeline.make_eval_batches(cfg, TOKENIZER, global_batch_size=4, num_batches=2))


def test_eval_batches_split_global_batches_between_processes(tmp_path):
    cfg = make_data_cfg(tmp_path, files=write_corpus(tmp_path, letter_documents(12)), validation_fraction=0.5)
    whole = pipeline.make_eval_batches(cfg, TOKENIZER, global_batch_size=4, num_batches=0)
    shares = [pipeline.make_eval_batches(cfg, TOKENIZER, global_batch_size=4, num_batches=0,
                                         process_index=p, process_count=2) for p in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(whole)
    for i, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([shares[0][i][key], shares[1][i][key]]), batch[key])


def test_unigram_baseline_matches_hand_computed_value(tmp_path):
    # Sorted files: 'a.txt' (position 0) is held out, 'b.txt' trains (validation_fraction=0.5).
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.txt").write_text("aab")
    cfg = make_data_cfg(tmp_path, files=f"{tmp_path}/a.txt,{tmp_path}/b.txt", validation_fraction=0.5)
    # Train tokens a a b eos: N = 4, V = 259; add-one: p(a) = 3/263, p(b) = p(eos) = 2/263.
    # Eval tokens a b eos.
    expected = -(math.log(3 / 263) + math.log(2 / 263) + math.log(2 / 263)) / 3
    assert pipeline.unigram_baseline(cfg, TOKENIZER) == pytest.approx(expected, rel=1e-12)
    # Capped at 2 train tokens (a a) and 2 eval tokens (a b): p(a) = 3/261, p(b) = 1/261.
    capped = -(math.log(3 / 261) + math.log(1 / 261)) / 2
    assert pipeline.unigram_baseline(cfg, TOKENIZER, max_tokens=2) == pytest.approx(capped, rel=1e-12)
