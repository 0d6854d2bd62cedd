"""Tokenizers: byte-level (always available), SentencePiece (trained offline by this module's CLI,
or any .model file) and Hugging Face `tokenizer.json` files (an imported checkpoint's own).

All share one interface (`Tokenizer`). Ours put the specials first: pad 0, eos 1, then the
tokenizer's own; ids below `num_special` never come out of `encode`, so MLM's random replacement
can draw from [num_special, vocab_size). A foreign vocabulary keeps its own ids: `num_special` is
then the run of special ids from 0 (LLaMA's unk, bos, eos: 3; GPT-2's: 0), pad falls back to eos
where there is none (padding is masked anyway), and `mask_id` is -1 where there is no mask token.

Train a SentencePiece model on a corpus' train split (see corpora.py for the datasets):

    python -m llm_jax.data.tokenizer train --dataset=stdlib --vocab_size=8000 --output=/tmp/spm/stdlib8k
"""
from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
import os
from typing import Protocol

import ml_collections
import numpy as np
import sentencepiece as spm

from llm_jax.data import corpora

TOKENIZERS = ("byte", "sentencepiece", "huggingface")
MASK_PIECE = "[MASK]"
HF_TOKENIZER_FILE = "tokenizer.json"
# Special tokens looked up by name when tokenizer_config.json does not name them, most common first.
_EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]")
_PAD_TOKENS = ("<pad>", "[PAD]", "<|padding|>")
_MASK_TOKENS = (MASK_PIECE, "<mask>")


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
    """A SentencePiece model: ours (`train_sentencepiece`: pad 0, eos 1, unk 2, [MASK] 3) or any
    other .model file (LLaMA's: unk 0, bos 1, eos 2, no pad, no mask) with its own ids."""

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
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"data.tokenizer_path={model_path!r}: the SentencePiece model has no end-of-sequence "
                             f"piece (eos_id), which packing and generation need")
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        self.mask_id = next((self._sp.piece_to_id(p) for p in _MASK_TOKENS
                             if self._sp.id_to_piece(self._sp.piece_to_id(p)) == p), -1)
        self.vocab_size = self._sp.vocab_size()
        self.num_special = _leading(lambda i: self._sp.is_control(i) or self._sp.is_unknown(i), self.vocab_size)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        # Ids past the vocabulary (the model's padding rows) carry no text.
        return self._sp.decode([int(i) for i in ids if 0 <= i < self.vocab_size])


def _leading(is_special, vocab_size: int) -> int:
    """How many ids from 0 on are special: the ids `encode` never produces."""
    n = 0
    while n < vocab_size and is_special(n):
        n += 1
    return n


def huggingface_tokenizer_file(path: str) -> str:
    """`data.tokenizer_path` for data.tokenizer=huggingface: a tokenizer.json, or a folder holding one."""
    return os.path.join(path, HF_TOKENIZER_FILE) if os.path.isdir(path) else path


class HuggingFaceTokenizer:
    """A Hugging Face fast tokenizer (`tokenizer.json`, loaded with the `tokenizers` library, no
    `transformers` needed). Special tokens come from the tokenizer_config.json beside it when there
    is one (eos_token, pad_token, mask_token), else from the usual names. `encode` adds no
    special tokens (no BOS/CLS/SEP): the pipelines add EOS themselves."""

    def __init__(self, path: str):
        if not path:
            raise ValueError("data.tokenizer_path is empty: give a tokenizer.json or the Hugging Face folder "
                             "holding it")
        file = huggingface_tokenizer_file(path)
        import tokenizers  # here: only runs with this tokenizer need it

        try:
            self._tok = tokenizers.Tokenizer.from_file(file)
        except Exception as e:  # noqa: BLE001  (a missing file and a malformed one raise alike)
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise ValueError(f"data.tokenizer_path={path!r}: cannot load a Hugging Face tokenizer from {file} "
                             f"({reason})") from None
        special_ids = {i for i, token in self._tok.get_added_tokens_decoder().items() if token.special}
        named = _configured_special_tokens(os.path.dirname(file))
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self.eos_id = self._token_id(named.get("eos_token"), _EOS_TOKENS)
        if self.eos_id < 0:
            raise ValueError(f"data.tokenizer_path={path!r}: no end-of-sequence token (eos_token in "
                             f"tokenizer_config.json, or one of {_EOS_TOKENS}), which packing and generation need")
        pad_id = self._token_id(named.get("pad_token"), _PAD_TOKENS)
        self.pad_id = pad_id if pad_id >= 0 else self.eos_id
        self.mask_id = self._token_id(named.get("mask_token"), _MASK_TOKENS)
        self.num_special = _leading(special_ids.__contains__, self.vocab_size)

    def _token_id(self, configured: str | None, candidates: tuple[str, ...]) -> int:
        for token in ([configured] if configured else []) + list(candidates):
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        return -1

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        # Special tokens and ids past the vocabulary (the model's padding rows) carry no text.
        return self._tok.decode([int(i) for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=True)


def _configured_special_tokens(folder: str) -> dict[str, str]:
    """eos_token / pad_token / mask_token as tokenizer_config.json names them (a string, or an
    AddedToken record with "content"); {} without that file."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as e:  # invalid JSON or UTF-8
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    named = {}
    for key in ("eos_token", "pad_token", "mask_token"):
        value = config.get(key)  # a file of Hugging Face's, not one of our configs: keys are optional
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value:
            named[key] = value
    return named


def get_tokenizer(name: str, path: str = "") -> Tokenizer:
    """The tokenizer named by `data.tokenizer` (`path` is `data.tokenizer_path`)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "sentencepiece":
        return SentencePieceTokenizer(path)
    if name == "huggingface":
        return HuggingFaceTokenizer(path)
    raise ValueError(f"data.tokenizer={name!r} is not one of {TOKENIZERS}")


def fingerprint(name: str, path: str, tokenizer: Tokenizer) -> dict:
    """What identifies a vocabulary: the tokenizer kind, its size and, for a model file, the
    file's SHA-256. Runs record it, so that resuming or starting from a run with another vocabulary
    fails even when both pad to the same embedding size (which a shape check cannot see)."""
    digest = ""
    if name != "byte" and path:
        if name == "huggingface":
            path = huggingface_tokenizer_file(path)
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
