"""A corpus where in-context learning is possible, and held-out tasks that measure it.

Each document is a run of `input -> label` lines under a mapping drawn afresh for that document:
a random function from a few input words to a few labels. Nothing about a mapping carries from one
document to the next, so the only way to predict a label is to find the same input earlier in the
context and copy its label (what induction heads do). The loss on labels falls with position in
the document, and a model that learned this predicts held-out mappings from k demonstrations:
accuracy rises with k (more chances that the query's input was demonstrated) and with model size
(better at the lookup). GPT-3's "language models are few-shot learners", in miniature.

    python -m llm_jax.data.icl corpus --out=data/icl/train --documents=20000
    python -m llm_jax.data.icl tasks --out=data/icl/tasks --mappings=50

The corpus is plain text files for `data.dataset=files`; the tasks are JSONL files in the few-shot
evaluator's generation format (`{"context": "ab ->", "target": "3"}`), one file per held-out
mapping, so that k-shot demonstrations come from the query's own mapping. Rendering matches the
corpus: demonstrations joined by EXAMPLE_SEPARATOR, context and target by TARGET_DELIMITER.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import string

import numpy as np

EXAMPLE_SEPARATOR = "\n"
TARGET_DELIMITER = " "
ARROW = "->"


@dataclasses.dataclass(frozen=True)
class MappingSpec:
    """The shape of every mapping: `num_inputs` words drawn from all two-letter lowercase words,
    each sent to one of `num_labels` labels (digits), and `examples` lines per document."""

    num_inputs: int = 8
    num_labels: int = 4
    examples: int = 24

    def __post_init__(self):
        if not 2 <= self.num_labels <= 10:
            raise ValueError(f"num_labels must be in [2, 10] (digit labels), got {self.num_labels}")
        if not 1 <= self.num_inputs <= 26 * 26:
            raise ValueError(f"num_inputs must be in [1, 676] (two-letter words), got {self.num_inputs}")
        if self.examples < 1:
            raise ValueError(f"examples must be >= 1, got {self.examples}")


WORDS = ["".join(pair) for pair in itertools.product(string.ascii_lowercase, repeat=2)]


def random_mapping(rng: np.random.Generator, spec: MappingSpec) -> dict[str, str]:
    inputs = rng.choice(len(WORDS), spec.num_inputs, replace=False)
    labels = rng.integers(0, spec.num_labels, spec.num_inputs)
    return {WORDS[i]: str(label) for i, label in zip(inputs, labels)}


def render(word: str, label: str) -> str:
    return f"{word} {ARROW}{TARGET_DELIMITER}{label}"


def document(rng: np.random.Generator, spec: MappingSpec) -> str:
    """One document: `spec.examples` lines of a fresh mapping, inputs drawn with replacement."""
    mapping = random_mapping(rng, spec)
    words = list(mapping)
    queries = rng.choice(len(words), spec.examples)
    return EXAMPLE_SEPARATOR.join(render(words[i], mapping[words[i]]) for i in queries) + EXAMPLE_SEPARATOR


def write_corpus(out_dir: str, num_documents: int, *, seed: int, spec: MappingSpec = MappingSpec(),
                 documents_per_file: int = 1000) -> list[str]:
    """Text files of documents (separated by a blank line, which the pipeline sees as one file's
    text: documents are short, so many share a file); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for start in range(0, num_documents, documents_per_file):
        path = os.path.join(out_dir, f"icl_{start // documents_per_file:05d}.txt")
        count = min(documents_per_file, num_documents - start)
        with open(path, "w") as f:
            f.write(EXAMPLE_SEPARATOR.join(document(rng, spec) for _ in range(count)))
        paths.append(path)
    return paths


def write_tasks(out_dir: str, num_mappings: int, *, seed: int, spec: MappingSpec = MappingSpec(),
                examples_per_mapping: int = 32) -> list[str]:
    """One JSONL task per held-out mapping (a seed the corpus does not use): every input of the
    mapping appears, then random ones, so the few-shot pool covers the mapping."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng([seed, 1])  # never the corpus' stream
    paths = []
    for index in range(num_mappings):
        mapping = random_mapping(rng, spec)
        words = list(mapping)
        order = words + [words[i] for i in rng.choice(len(words), max(0, examples_per_mapping - len(words)))]
        path = os.path.join(out_dir, f"mapping_{index:03d}.jsonl")
        with open(path, "w") as f:
            for word in order:
                f.write(json.dumps({"context": f"{word} {ARROW}", "target": mapping[word]}) + "\n")
        paths.append(path)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("corpus", "tasks"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--documents", type=int, default=20_000, help="corpus: documents to write")
    parser.add_argument("--mappings", type=int, default=50, help="tasks: held-out mappings (one file each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_inputs", type=int, default=8)
    parser.add_argument("--num_labels", type=int, default=4)
    parser.add_argument("--examples", type=int, default=24, help="lines per document")
    args = parser.parse_args(argv)
    spec = MappingSpec(args.num_inputs, args.num_labels, args.examples)
    if args.what == "corpus":
        paths = write_corpus(args.out, args.documents, seed=args.seed, spec=spec)
    else:
        paths = write_tasks(args.out, args.mappings, seed=args.seed, spec=spec)
    print(f"wrote {len(paths)} files to {args.out}")


if __name__ == "__main__":
    main()
