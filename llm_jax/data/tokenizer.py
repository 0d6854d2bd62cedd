"""Tokenizers: byte-level (always available) and SentencePiece (trained offline by this module's CLI).

Both share one interface (`Tokenizer`) and one id layout for specials: pad 0, eos 1, then the
tokenizer's own specials; ids below `num_special` never come out of `encode`, so MLM's random
replacement can draw from [num_special, vocab_size).

Train a SentencePiece model on a corpus' train split (see corpora.py for the datasets):

    python -m llm_jax.data.tokenizer train --dataset=stdlib --vocab_size=8000 --output=/tmp/spm/stdlib8k
"""
from __future__ import annotations

import argparse
import hashlib
from collections.abc import Iterable, Iterator, Sequence
import os
from typing import Protocol

import ml_collections
import numpy as np
import sentencepiece as spm

from llm_jax.data import corpora

TOKENIZERS = ("byte", "sentencepiece")
MASK_PIECE = "[MASK]"


class Tokenizer(Protocol):
    """What the pipeline, the model and the objectives need from a tokenizer."""

    vocab_size: int
    pad_id: int
    eos_id: int
    mask_id: int
    num_special: int

    def encode(self, text: str) -> list[int]:
        ...

    def decode(self, ids: Iterable[int]) -> str:
        ...


class ByteTokenizer:
    """UTF-8 bytes shifted by 3 (ByT5's layout): pad 0, eos 1, mask 2, byte b -> b + 3."""

    pad_id = 0
    eos_id = 1
    mask_id = 2
    num_special = 3
    vocab_size = 256 + num_special

    def encode(self, text: str) -> list[int]:
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return (data.astype(np.int32) + self.num_special).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        # Ids outside the byte range (specials, or the model's vocabulary padding) carry no text.
        data = bytes(i - self.num_special for i in ids if self.num_special <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model trained by `train_sentencepiece` (pad 0, eos 1, unk 2, [MASK] 3)."""

    def __init__(self, model_path: str):
        if not model_path:
            raise ValueError(
                "data.tokenizer_path is empty: give the .model file written by "
                "`python -m llm_jax.data.tokenizer train`"
            )
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_path)
        except (OSError, RuntimeError) as e:
            reason = str(e).splitlines()[0]
            raise ValueError(
                f"data.tokenizer_path={model_path!r}: cannot load a SentencePiece model ({reason})"
            ) from None
        self.mask_id = self._sp.piece_to_id(MASK_PIECE)
        layout = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.bos_id(), self.mask_id)
        if layout != (0, 1, 2, -1, 3):
            raise ValueError(
                f"data.tokenizer_path={model_path!r}: special ids (pad, eos, unk, bos, {MASK_PIECE}) are "
                f"{layout}, expected (0, 1, 2, -1, 3); train it with `python -m llm_jax.data.tokenizer train`"
            )
        self.pad_id = 0
        self.eos_id = 1
        self.num_special = self.mask_id + 1
        self.vocab_size = self._sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def get_tokenizer(name: str, path: str = "") -> Tokenizer:
    """The tokenizer named by `data.tokenizer` (`path` is `data.tokenizer_path`)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "sentencepiece":
        return SentencePieceTokenizer(path)
    raise ValueError(f"data.tokenizer={name!r} is not one of {TOKENIZERS}")


def fingerprint(name: str, path: str, tokenizer: Tokenizer) -> dict:
    """What identifies a vocabulary: the tokenizer kind, its size and, for a model file, the
    file's SHA-256. Runs record it, so that resuming or starting from a run with another vocabulary
    fails even when both pad to the same embedding size (which a shape check cannot see)."""
    digest = ""
    if name != "byte" and path:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    return {"tokenizer": name, "vocab_size": int(tokenizer.vocab_size), "sha256": digest}


def _training_sentences(documents: Iterable[str], max_sentence_chars: int) -> Iterator[str]:
    """Cuts documents into runs of whole lines of at most `max_sentence_chars` characters.

    Multi-line "sentences" (newlines kept) let SentencePiece learn pieces such as ':\\n' that
    matter for code; lines longer than the limit are cut so that no text is dropped.
    """
    for document in documents:
        sentence = ""
        for line in document.splitlines(keepends=True):
            if sentence and len(sentence) + len(line) > max_sentence_chars:
                yield sentence
                sentence = ""
            while len(line) > max_sentence_chars:
                yield line[:max_sentence_chars]
                line = line[max_sentence_chars:]
            sentence += line
        if sentence:
            yield sentence


def train_sentencepiece(
    documents: Iterable[str],
    *,
    vocab_size: int,
    output_prefix: str,
    max_sentence_chars: int = 2048,
    model_type: str = "unigram",
) -> str:
    """Trains a SentencePiece model on `documents`; writes `output_prefix`.model/.vocab.

    The options make every text round-trip exactly: identity normalisation, whitespace kept as
    is (runs of spaces may become pieces, for indentation), no dummy prefix, and byte fallback
    for characters outside the vocabulary. [MASK] is a control symbol, so no text encodes to it.

    Returns:
        The path of the .model file.
    """
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_sentences(documents, max_sentence_chars),
        model_prefix=output_prefix,
        model_type=model_type,
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        control_symbols=[MASK_PIECE],
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        # SentencePiece counts bytes and silently skips longer sentences; 4 bytes per character
        # is the UTF-8 worst case.
        max_sentence_length=4 * max_sentence_chars,
        num_threads=os.cpu_count() or 1,
        # Errors only: it warns about every piece holding a newline (learnt on purpose), which the
        # human-readable .vocab cannot show unambiguously; the .model is exact.
        minloglevel=2,
    )
    return output_prefix + ".model"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llm_jax.data.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a SentencePiece model on a corpus' train split")
    train.add_argument("--dataset", default="stdlib", help="as data.dataset: stdlib | files | a TFDS name")
    train.add_argument("--files", default="", help="as data.files (for --dataset=files)")
    train.add_argument("--tfds_data_dir", default="", help="as data.tfds_data_dir")
    train.add_argument("--text_key", default="text", help="as data.text_key (TFDS catalogue names)")
    train.add_argument("--split", default="train", help="the split to train on")
    train.add_argument("--validation_fraction", type=float, default=0.02, help="as data.validation_fraction")
    train.add_argument("--max_documents", type=int, default=0, help="as data.max_documents (0 = all)")
    train.add_argument("--vocab_size", type=int, default=8000)
    train.add_argument("--model_type", default="unigram", choices=("unigram", "bpe"))
    train.add_argument("--max_sentence_chars", type=int, default=2048,
                       help="documents are cut into runs of whole lines of at most this many characters")
    train.add_argument("--output", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    """The CLI; returns the path of the trained .model file."""
    args = _parse_args(argv)
    corpus_cfg = ml_collections.ConfigDict(dict(
        dataset=args.dataset,
        files=args.files,
        tfds_data_dir=args.tfds_data_dir,
        text_key=args.text_key,
        validation_fraction=args.validation_fraction,
        max_documents=args.max_documents,
    ))
    texts = corpora.load_split(corpus_cfg, args.split)
    print(f"training a {args.model_type} SentencePiece model of {args.vocab_size} pieces on "
          f"{len(texts)} documents of {args.dataset}/{args.split}", flush=True)
    model_path = train_sentencepiece(
        (texts[i] for i in range(len(texts))),
        vocab_size=args.vocab_size,
        output_prefix=args.output,
        max_sentence_chars=args.max_sentence_chars,
        model_type=args.model_type,
    )
    print(f"wrote {model_path}")
    return model_path


if __name__ == "__main__":
    main()
