"""A corpus where in-context learning is possible, and held-out tasks that measure it.

Each document is a long run of `<input><label>` pairs, `a3 f7 c0 a3 ...`, under a mapping drawn
afresh for that document: a random function from `num_inputs` fixed input letters (a, b, c, ...)
to `num_labels` digit labels. Nothing about a mapping carries from one document to the next, so
the only way to predict a label is to find the same input earlier in the context and copy the
label after it: what induction heads do. A model that learned this labels a held-out mapping's
query from k demonstrations, and its accuracy rises with k (more chances that the query's input
was demonstrated) and with model size (better at the lookup). GPT-3's "language models are
few-shot learners", in miniature.

    python -m llm_jax.data.icl corpus --out=data/icl/train --documents=10000
    python -m llm_jax.data.icl tasks --out=data/icl/tasks --mappings=40

Why this shape (experiments/icl_scaling/README.md has the measurements):
  - one character per input and per label, so a pair is two byte tokens and a demonstration
    three: 16 shots and the query fit in 50 tokens;
  - the inputs are the same letters in every document and only the labels change, so the label
    is all there is to learn in context. When each document also drew its inputs from the
    alphabet, small models first had to learn the document's letter set and stayed on the loss
    plateau before the lookup for every budget tried here;
  - documents are long (many pairs, one mapping), so a packed training row rarely straddles two
    mappings.

The corpus is plain text files for `data.dataset=files` (documents separated by a newline); the
tasks are JSONL files in the few-shot evaluator's generation format (`{"context": "a", "target":
"3"}`), one file per held-out mapping, so that k-shot demonstrations come from the query's own
mapping. Evaluate with the corpus' rendering, and let demonstrations share the query's input
(the harness's default hides them, which would make the lookup impossible):

    python -m llm_jax.fewshot --workdir=RUN --tasks='data/icl/tasks/*.jsonl' --pool \\
        --example_separator=' ' --target_delimiter='' --keep_query_context --shots=0,1,4,8,16
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import string

import numpy as np

EXAMPLE_SEPARATOR = " "
TARGET_DELIMITER = ""
# Tokens to generate after a query: the one-digit label and a separator. fewshot's default (the
# target plus 8 spare) would cut the first demonstrations of an 8-shot prompt from a 32-token context.
NEW_TOKENS = 2
DOCUMENT_SEPARATOR = "\n"
# What the few-shot evaluator needs to render and score the tasks like the corpus.
FEWSHOT_FLAGS = ("--example_separator= ", "--target_delimiter=", "--keep_query_context")


@dataclasses.dataclass(frozen=True)
class MappingSpec:
    """The shape of every mapping: the first `num_inputs` lowercase letters, each sent to one of
    `num_labels` digit labels, and `examples` pairs per document."""

    num_inputs: int = 8
    num_labels: int = 10
    examples: int = 300

    def __post_init__(self):
        if not 2 <= self.num_labels <= 10:
            raise ValueError(f"num_labels must be in [2, 10] (digit labels), got {self.num_labels}")
        if not 1 <= self.num_inputs <= 26:
            raise ValueError(f"num_inputs must be in [1, 26] (lowercase letters), got {self.num_inputs}")
        if self.examples < 1:
            raise ValueError(f"examples must be >= 1, got {self.examples}")

    @property
    def inputs(self) -> str:
        return string.ascii_lowercase[:self.num_inputs]


def random_mapping(rng: np.random.Generator, spec: MappingSpec) -> dict[str, str]:
    labels = rng.integers(0, spec.num_labels, spec.num_inputs)
    return {letter: str(label) for letter, label in zip(spec.inputs, labels)}


def render(letter: str, label: str) -> str:
    return f"{letter}{TARGET_DELIMITER}{label}"


def document(rng: np.random.Generator, spec: MappingSpec) -> str:
    """One document: `spec.examples` pairs of a fresh mapping, inputs drawn with replacement."""
    mapping = random_mapping(rng, spec)
    queries = rng.integers(0, spec.num_inputs, spec.examples)
    return EXAMPLE_SEPARATOR.join(render(spec.inputs[i], mapping[spec.inputs[i]]) for i in queries)


def write_corpus(out_dir: str, num_documents: int, *, seed: int, spec: MappingSpec = MappingSpec(),
                 documents_per_file: int = 500) -> list[str]:
    """Text files of documents, one per line; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for start in range(0, num_documents, documents_per_file):
        path = os.path.join(out_dir, f"icl_{start // documents_per_file:05d}.txt")
        count = min(documents_per_file, num_documents - start)
        with open(path, "w") as f:
            f.write(DOCUMENT_SEPARATOR.join(document(rng, spec) for _ in range(count)) + DOCUMENT_SEPARATOR)
        paths.append(path)
    return paths


def write_tasks(out_dir: str, num_mappings: int, *, seed: int, spec: MappingSpec = MappingSpec(),
                examples_per_mapping: int = 32) -> list[str]:
    """One JSONL task per held-out mapping (a seed stream the corpus does not use): every input of
    the mapping once, then random ones, so the few-shot pool covers the mapping."""
    if examples_per_mapping < spec.num_inputs:
        raise ValueError(f"examples_per_mapping ({examples_per_mapping}) must cover the {spec.num_inputs} inputs")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng([seed, 1])  # never the corpus' stream
    paths = []
    for index in range(num_mappings):
        mapping = random_mapping(rng, spec)
        extra = rng.integers(0, spec.num_inputs, examples_per_mapping - spec.num_inputs)
        order = list(spec.inputs) + [spec.inputs[i] for i in extra]
        path = os.path.join(out_dir, f"mapping_{index:03d}.jsonl")
        with open(path, "w") as f:
            for letter in order:
                f.write(json.dumps({"context": letter, "target": mapping[letter]}) + "\n")
        paths.append(path)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("corpus", "tasks"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--documents", type=int, default=10_000, help="corpus: documents to write")
    parser.add_argument("--mappings", type=int, default=40, help="tasks: held-out mappings (one file each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_inputs", type=int, default=8)
    parser.add_argument("--num_labels", type=int, default=10)
    parser.add_argument("--examples", type=int, default=300, help="corpus: pairs per document")
    args = parser.parse_args(argv)
    try:
        spec = MappingSpec(args.num_inputs, args.num_labels, args.examples)
    except ValueError as e:
        raise SystemExit(f"error: --{e}") from None
    if args.what == "corpus":
        paths = write_corpus(args.out, args.documents, seed=args.seed, spec=spec)
    else:
        paths = write_tasks(args.out, args.mappings, seed=args.seed, spec=spec)
    print(f"wrote {len(paths)} files to {args.out}")


if __name__ == "__main__":
    main()
