"""The in-context-learning corpus: a fresh mapping per document, consistent inside it, and
held-out tasks rendered the way the corpus is."""
import json
import os
import re

import numpy as np
import pytest

from llm_jax.data import icl

PAIR = re.compile(r"^([a-z])(\d)$")


def mapping_of(document_text):
    pairs = [PAIR.match(pair).groups() for pair in document_text.strip("\n").split(icl.EXAMPLE_SEPARATOR)]
    mapping = {}
    for word, label in pairs:
        assert mapping.setdefault(word, label) == label  # one label per input inside a document
    return pairs, mapping


def test_documents_follow_one_mapping_each_and_mappings_change():
    spec = icl.MappingSpec(num_inputs=5, num_labels=4, examples=40)
    rng = np.random.default_rng(0)
    mappings = []
    for _ in range(20):
        pairs, mapping = mapping_of(icl.document(rng, spec))
        assert len(pairs) == 40 and set(mapping) <= set("abcde") and set(mapping.values()) <= set("0123")
        mappings.append(mapping)
    assert len({tuple(sorted(m.items())) for m in mappings}) >= 18  # 4^5 mappings: rare repeats


def test_corpus_files_are_deterministic_and_split_into_documents(tmp_path):
    spec = icl.MappingSpec(examples=6)
    paths = icl.write_corpus(str(tmp_path / "a"), 25, seed=3, spec=spec, documents_per_file=10)
    again = icl.write_corpus(str(tmp_path / "b"), 25, seed=3, spec=spec, documents_per_file=10)
    assert [os.path.basename(p) for p in paths] == ["icl_00000.txt", "icl_00001.txt", "icl_00002.txt"]
    texts = [open(p).read() for p in paths]
    assert texts == [open(p).read() for p in again]
    documents = [d for text in texts for d in text.split(icl.DOCUMENT_SEPARATOR) if d]
    assert len(documents) == 25 and all(len(mapping_of(d)[0]) == 6 for d in documents)


def test_tasks_cover_their_mapping_and_render_like_the_corpus(tmp_path):
    spec = icl.MappingSpec(num_inputs=6, num_labels=4)
    paths = icl.write_tasks(str(tmp_path), 3, seed=0, spec=spec, examples_per_mapping=10)
    assert len(paths) == 3
    for path in paths:
        records = [json.loads(line) for line in open(path)]
        assert len(records) == 10
        rendered = icl.EXAMPLE_SEPARATOR.join(r["context"] + icl.TARGET_DELIMITER + r["target"] for r in records)
        _, mapping = mapping_of(rendered)  # consistent, and in the corpus' format
        assert len(mapping) == 6  # every input of the mapping is in the pool


@pytest.mark.parametrize("field, value", [("num_labels", 11), ("num_inputs", 27), ("examples", 0)])
def test_bad_spec_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        icl.MappingSpec(**{field: value})


def test_task_pool_must_cover_the_inputs(tmp_path):
    with pytest.raises(ValueError, match="examples_per_mapping"):
        icl.write_tasks(str(tmp_path), 1, seed=0, spec=icl.MappingSpec(num_inputs=8), examples_per_mapping=5)
