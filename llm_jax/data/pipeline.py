"""Grain pipelines from a corpus (corpora.py) to host batches, and the unigram baseline.

Train: documents -> this process' shard -> shuffle (a new order each epoch, from the seed) ->
       repeat forever -> tokenize, eos after each document -> pack rows of exactly seq_len ->
       local batches -> background prefetch. The iterator's get_state()/set_state() go into
       checkpoints.
Eval:  documents in the fixed order -> the same tokenization and packing (the last row padded)
       -> global batches, of which each process keeps its own rows.

A batch is `{"tokens": int32[B, L], "mask": int32[B, L]}` with B = global batch / process count
and mask 1 for real tokens (docs/architecture.md).
"""
from __future__ import annotations

import copy
import functools
import itertools
import math

import grain
import numpy as np

from llm_jax.data import corpora
from llm_jax.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]
# Documents are read and tokenized a little ahead by a few threads: enough to hide the reads,
# few enough not to fight the training loop for the GIL.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)


class PackedRowsIterDataset(grain.IterDataset):
    """Concatenates token arrays and cuts rows of exactly `seq_len` tokens (GPT-2 / nanoGPT packing).

    A document that does not fit continues in the next row, so no token is dropped and only the
    end of a finite stream gives a short row, padded with `pad_id` and mask 0. (Grain's
    ConcatThenSplitIterDataset packs the same way, but its state holds tuples that come back from
    a JSON checkpoint as lists, and the restored iterator then repeats a row.)
    """

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad_id = pad_id

    def __iter__(self) -> grain.DatasetIterator:
        return _PackedRowsIterator(self._parent.__iter__(), seq_len=self._seq_len, pad_id=self._pad_id)


class _PackedRowsIterator(grain.DatasetIterator):
    """State: the parent's state before the current document, and how many of its tokens are used."""

    def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, pad_id: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad_id = pad_id
        self._document_state = copy.deepcopy(parent.get_state())
        self._document = np.zeros(0, np.int32)
        self._offset = 0

    def __next__(self) -> Batch:
        pieces, filled = [], 0
        while filled < self._seq_len:
            if self._offset == len(self._document) and not self._read_document():
                if not pieces:
                    raise StopIteration
                break
            piece = self._document[self._offset : self._offset + self._seq_len - filled]
            pieces.append(piece)
            filled += len(piece)
            self._offset += len(piece)
        tokens = np.full(self._seq_len, self._pad_id, np.int32)
        tokens[:filled] = np.concatenate(pieces)
        mask = (np.arange(self._seq_len) < filled).astype(np.int32)
        return {"tokens": tokens, "mask": mask}

    def _read_document(self) -> bool:
        """Moves to the parent's next document; False at the end of the stream."""
        state = copy.deepcopy(self._parent.get_state())
        try:
            document = next(self._parent)
        except StopIteration:
            return False
        self._document_state, self._document, self._offset = state, document, 0
        return True

    def get_state(self) -> dict:
        return {"document": copy.deepcopy(self._document_state), "offset": self._offset}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["document"])
        self._document_state = copy.deepcopy(state["document"])
        self._document, self._offset = np.zeros(0, np.int32), 0
        if state["offset"] > 0:
            # Re-read the document the saved rows stopped in, then skip what they used.
            self._read_document()
            self._offset = state["offset"]


def encode_document(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """A document's tokens followed by eos, which separates documents once they are packed."""
    return np.asarray(tokenizer.encode(text) + [tokenizer.eos_id], dtype=np.int32)


def _documents(data_cfg, split: str) -> grain.MapDataset:
    return grain.MapDataset.source(corpora.load_split(data_cfg, split))


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(
            f"data.batch_size ({global_batch_size}) must be divisible by the number of processes ({process_count})"
        )
    return global_batch_size // process_count


def make_train_iterator(
    data_cfg,
    tokenizer: Tokenizer,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """An endless iterator of this process' train batches, with get_state()/set_state().

    Each process packs its own documents (every process_count-th one), so processes never see
    the same text; an epoch is one pass over a process' documents, each in a new order.
    """
    batch_size = _local_batch_size(global_batch_size, process_count)
    documents = _documents(data_cfg, data_cfg.train_split)[process_index::process_count]
    if not len(documents):
        raise ValueError(
            f"data.train_split={data_cfg.train_split!r} has fewer documents than processes ({process_count})"
        )
    if data_cfg.shuffle:
        # Shuffling before repeating reshuffles each epoch: Grain seeds epoch e with seed + e, so
        # the seed is scrambled first, or runs with seeds s and s + 1 would share orders one epoch apart.
        documents = documents.shuffle(seed=int(np.random.SeedSequence(seed).generate_state(1)[0]))
    tokens = documents.repeat().map(functools.partial(encode_document, tokenizer))
    rows = PackedRowsIterDataset(tokens.to_iter_dataset(_READ_OPTIONS), seq_len=data_cfg.seq_len,
                                 pad_id=tokenizer.pad_id)
    batches = rows.batch(batch_size, drop_remainder=True)
    if data_cfg.prefetch > 0:
        # Its state is that of the last batch handed out, not of the batches waiting in the queue.
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=data_cfg.prefetch)
    return iter(batches)


def make_eval_batches(
    data_cfg,
    tokenizer: Tokenizer,
    *,
    global_batch_size: int,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[Batch]:
    """This process' share of the first `num_batches` global eval batches (0: the whole split).

    The eval split is packed in its fixed order, the same on every process and every call; global
    batch i holds rows [i * global_batch_size, (i + 1) * global_batch_size) and process p keeps
    its block p of them. The last batch is filled up with rows of pad tokens and mask 0, so every
    process gets the same number of batches. A split shorter than `num_batches` gives fewer.
    """
    batch_size = _local_batch_size(global_batch_size, process_count)
    tokens = _documents(data_cfg, data_cfg.eval_split).map(functools.partial(encode_document, tokenizer))
    rows = PackedRowsIterDataset(tokens.to_iter_dataset(_READ_OPTIONS), seq_len=data_cfg.seq_len,
                                 pad_id=tokenizer.pad_id)
    rows = list(itertools.islice(rows, num_batches * global_batch_size if num_batches > 0 else None))
    num_global_batches = math.ceil(len(rows) / global_batch_size)
    padding_row = {"tokens": np.full(data_cfg.seq_len, tokenizer.pad_id, np.int32),
                   "mask": np.zeros(data_cfg.seq_len, np.int32)}
    rows += [padding_row] * (num_global_batches * global_batch_size - len(rows))
    batches = []
    for start in range(0, len(rows), global_batch_size):
        own_rows = rows[start + process_index * batch_size : start + (process_index + 1) * batch_size]
        batches.append({key: np.stack([row[key] for row in own_rows]) for key in padding_row})
    return batches


def _token_counts(documents: grain.MapDataset, tokenizer: Tokenizer, max_tokens: int) -> np.ndarray:
    """How often each id occurs in the first `max_tokens` tokens of `documents` (eos included)."""
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    remaining = max_tokens
    for text in documents:
        tokens = encode_document(tokenizer, text)[:remaining]
        counts += np.bincount(tokens, minlength=tokenizer.vocab_size)
        remaining -= len(tokens)
        if remaining == 0:
            break
    return counts


def unigram_baseline(data_cfg, tokenizer: Tokenizer, *, max_tokens: int = 2_000_000) -> float:
    """Cross-entropy (nats/token) on the eval split of a unigram model fitted on the train split.

    p(t) = (count(t) + 1) / (N + vocab_size) over up to `max_tokens` train tokens (documents in a
    fixed shuffled order, so the sample spans the corpus), evaluated on up to `max_tokens` eval
    tokens. An LM that does not beat this has learnt nothing beyond token frequencies.
    """
    train_counts = _token_counts(_documents(data_cfg, data_cfg.train_split).shuffle(seed=0), tokenizer, max_tokens)
    eval_counts = _token_counts(_documents(data_cfg, data_cfg.eval_split), tokenizer, max_tokens)
    log_probs = np.log(train_counts + 1.0) - np.log(train_counts.sum() + tokenizer.vocab_size)
    return float(-(eval_counts * log_probs).sum() / eval_counts.sum())
