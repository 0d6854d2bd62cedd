"""Tokenized host batches for post-training: SFT, preference pairs (reward model, DPO), K-way rankings.

A sequence is the prompt's tokens, then the response's tokens, then EOS (prompt and response are
tokenized separately, so their boundary is exact). `mask` is 1 on real tokens; `loss_mask` is 1
where tokens[t] is a target, i.e. a response token or the final EOS (the train step shifts:
logits at t - 1 predict tokens[t]); a sequence's first token never is, even with an empty prompt.

Too long for `seq_len` (TRL's names for the policies):
  keep_end    drop the start of the prompt so that the whole response fits; the prompt keeps at
              least its last token (so the first response token is still a target) and a
              response that still does not fit loses its end, EOS included.
  keep_start  keep the whole prompt and cut the end of the response (EOS included); a prompt
              that leaves no room for any response token is dropped.
  drop        skip the example.
The examples of one prompt (chosen and rejected, the K ranked responses) are cut together: one
prompt cut for all, so they always share the same prompt tokens. Examples are tokenized once when
the batches are made; `TruncationStats` counts them (per prompt, for this process' examples).

Train iterators are endless, in a new order each epoch (from the seed), with JSON-able
get_state()/set_state() (the epoch and the position in it) for exact resumption. Eval batches are
a finite list in the given order, the last batch filled up with padding rows (mask 0; valid 0 in
preference and ranking batches).
`batch_size` / `prompts_per_batch` are global; with several processes each one trains on every
process_count-th example and keeps its own block of rows of each eval batch (as pipeline.py does).
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from llm_jax.data.jsonl import PreferenceExample, RankingExample, SFTExample
from llm_jax.data.tokenizer import Tokenizer

TRUNCATIONS = ("keep_end", "keep_start", "drop")
PAIRINGS = ("all", "best_worst")
Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class TruncationStats:
    """How many examples (prompts) were seen, cut to fit, or dropped; log it with dataclasses.asdict."""

    seen: int = 0
    truncated: int = 0
    dropped: int = 0


@dataclasses.dataclass(frozen=True)
class _Group:
    """One prompt's tokenized sequences (prompt + response + EOS, cut to fit) and the responses' ranks."""

    sequences: list[np.ndarray]
    prompt_len: int
    ranks: list[int]
    # Per-sequence log-probs under DPO's frozen reference model, computed once before training.
    reference_logps: np.ndarray | None = None


class _Stream(Protocol):
    """Where batch builders take their examples from: item indices; peek() is None once a finite one ends."""

    def peek(self) -> int | None:
        ...

    def pop(self) -> int:
        ...


class _ShuffledStream:
    """Item indices forever, each epoch in a new order drawn from (seed, epoch)."""

    def __init__(self, num_items: int, seed: int):
        self._num_items, self._seed = num_items, seed
        self.set_state({"epoch": 0, "index": 0, "num_items": num_items})

    def peek(self) -> int:
        return int(self._order[self._index])

    def pop(self) -> int:
        item = self.peek()
        self._index += 1
        if self._index == self._num_items:
            self._start_epoch(self._epoch + 1)
        return item

    def get_state(self) -> dict[str, int]:
        return {"epoch": self._epoch, "index": self._index, "num_items": self._num_items}

    def set_state(self, state: dict[str, int]) -> None:
        if state["num_items"] != self._num_items:
            raise ValueError(f"the saved iterator state is for {state['num_items']} examples, "
                             f"this dataset has {self._num_items}")
        self._start_epoch(state["epoch"])
        self._index = state["index"]

    def _start_epoch(self, epoch: int) -> None:
        # SeedSequence mixes (seed, epoch), so seeds s and s + 1 share no epoch's order.
        self._epoch, self._index = epoch, 0
        self._order = np.random.default_rng([self._seed, epoch]).permutation(self._num_items)


class _OnceStream:
    """Item indices 0..num_items-1 once, in order."""

    def __init__(self, num_items: int):
        self._num_items, self._index = num_items, 0

    def peek(self) -> int | None:
        return self._index if self._index < self._num_items else None

    def pop(self) -> int:
        self._index += 1
        return self._index - 1


class BatchIterator:
    """Endless train batches; get_state()/set_state() save and restore the position exactly."""

    def __init__(self, next_batch: Callable[[_Stream], Batch], num_items: int, seed: int):
        self._next_batch = next_batch
        self._stream = _ShuffledStream(num_items, seed)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        return self._next_batch(self._stream)

    def get_state(self) -> dict[str, int]:
        return self._stream.get_state()

    def set_state(self, state: dict[str, int]) -> None:
        self._stream.set_state(state)


# Encoding: token sequences cut to fit seq_len.

def encode_sft(tokenizer: Tokenizer, example: SFTExample, seq_len: int,
               truncation: str = "keep_end") -> Batch | None:
    """One padded row {'tokens', 'mask', 'loss_mask'} (int32[seq_len]); None when the policy drops it."""
    _check_policy(seq_len, truncation)
    group = _encode_group(tokenizer, example.prompt, [example.response], [0], seq_len, truncation,
                          TruncationStats())
    return None if group is None else _row(group.sequences[0], group.prompt_len, seq_len, tokenizer.pad_id)


def _encode_group(tokenizer: Tokenizer, prompt: str, responses: Sequence[str], ranks: Sequence[int],
                  seq_len: int, truncation: str, stats: TruncationStats) -> _Group | None:
    stats.seen += 1
    prompt_ids = tokenizer.encode(prompt)
    response_ids = [tokenizer.encode(response) + [tokenizer.eos_id] for response in responses]
    fitted = _fit(prompt_ids, response_ids, seq_len, truncation)
    if fitted is None:
        stats.dropped += 1
        return None
    kept_prompt, kept_responses = fitted
    stats.truncated += (kept_prompt, kept_responses) != (prompt_ids, response_ids)
    sequences = [np.asarray(kept_prompt + response, np.int32) for response in kept_responses]
    return _Group(sequences=sequences, prompt_len=len(kept_prompt), ranks=list(ranks))


def _fit(prompt: list[int], responses: list[list[int]], seq_len: int,
         truncation: str) -> tuple[list[int], list[list[int]]] | None:
    """The prompt and responses cut so that prompt + each response fits in seq_len; None to drop."""
    longest = max(len(response) for response in responses)
    if len(prompt) + longest <= seq_len:
        return prompt, responses
    if truncation == "drop":
        return None
    if truncation == "keep_start":
        room = seq_len - len(prompt)
        return None if room <= 0 else (prompt, [response[:room] for response in responses])
    kept = max(seq_len - longest, min(len(prompt), 1))
    return prompt[len(prompt) - kept:], [response[: seq_len - kept] for response in responses]


def _check_policy(seq_len: int, truncation: str) -> None:
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation={truncation!r} is not one of {TRUNCATIONS}")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} leaves no room for a prompt token and a target")


def _encode_all(groups: Sequence[tuple[str, Sequence[str], Sequence[int]]], tokenizer: Tokenizer,
                seq_len: int, truncation: str) -> tuple[list[_Group], TruncationStats]:
    _check_policy(seq_len, truncation)
    stats = TruncationStats()
    encoded = [_encode_group(tokenizer, *group, seq_len, truncation, stats) for group in groups]
    kept = [group for group in encoded if group is not None]
    if not kept:
        raise ValueError(f"all {stats.seen} examples were dropped: none fits seq_len={seq_len} "
                         f"with truncation={truncation!r}")
    return kept, stats


# Rows and batches.

def _row(sequence: np.ndarray, prompt_len: int, seq_len: int, pad_id: int) -> Batch:
    length = len(sequence)
    tokens = np.full(seq_len, pad_id, np.int32)
    tokens[:length] = sequence
    position = np.arange(seq_len)
    # A sequence's first token has nothing before it to be predicted from, so it is never a target
    # (with an empty prompt, packed, it would otherwise be predicted from the previous example).
    first_target = max(prompt_len, 1)
    return {"tokens": tokens, "mask": (position < length).astype(np.int32),
            "loss_mask": ((position >= first_target) & (position < length)).astype(np.int32)}


def _padding_row(seq_len: int, pad_id: int) -> Batch:
    return _row(np.zeros(0, np.int32), 0, seq_len, pad_id)


def _stack(rows: list[Batch]) -> Batch:
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def _sft_batch(groups: list[_Group], stream: _Stream, num_rows: int, seq_len: int,
               pad_id: int) -> Batch | None:
    """One example per row; rows missing at the end of a finite stream are padding."""
    rows = []
    while len(rows) < num_rows and stream.peek() is not None:
        group = groups[stream.pop()]
        rows.append(_row(group.sequences[0], group.prompt_len, seq_len, pad_id))
    if not rows:
        return None
    return _stack(rows + [_padding_row(seq_len, pad_id)] * (num_rows - len(rows)))


def _packed_row(groups: list[_Group], stream: _Stream, seq_len: int, pad_id: int) -> Batch | None:
    """As many whole examples as fit in order (none is split), segment ids 1, 2, ..., positions per example."""
    rows, used = [], 0
    while stream.peek() is not None and used + len(groups[stream.peek()].sequences[0]) <= seq_len:
        group = groups[stream.pop()]
        length = len(group.sequences[0])
        row = _row(group.sequences[0], group.prompt_len, length, pad_id)
        row["segment_ids"] = np.full(length, len(rows) + 1, np.int32)
        row["positions"] = np.arange(length, dtype=np.int32)
        rows.append(row)
        used += length
    if not rows:
        return None
    padding = _packed_padding_row(seq_len - used, pad_id)
    return {key: np.concatenate([row[key] for row in rows] + [padding[key]]) for key in padding}


def _packed_padding_row(length: int, pad_id: int) -> Batch:
    row = _padding_row(length, pad_id)
    row["segment_ids"] = np.zeros(length, np.int32)
    row["positions"] = np.zeros(length, np.int32)
    return row


def _packed_sft_batch(groups: list[_Group], stream: _Stream, num_rows: int, seq_len: int,
                      pad_id: int) -> Batch | None:
    rows = list(itertools.takewhile(lambda row: row is not None,
                                    (_packed_row(groups, stream, seq_len, pad_id) for _ in range(num_rows))))
    if not rows:
        return None
    return _stack(rows + [_packed_padding_row(seq_len, pad_id)] * (num_rows - len(rows)))


def _group_batch(groups: list[_Group], stream: _Stream, num_groups: int, group_size: int,
                 seq_len: int, pad_id: int) -> Batch | None:
    """[num_groups, group_size, seq_len] rows of each prompt's responses, with ranks and valid [P, K]."""
    rows = []
    ranks, valid = np.zeros((num_groups, group_size), np.int32), np.zeros((num_groups, group_size), np.int32)
    reference_logps = np.zeros((num_groups, group_size), np.float32)
    while len(rows) < num_groups * group_size and stream.peek() is not None:
        group = groups[stream.pop()]
        p, k = len(rows) // group_size, len(group.sequences)
        rows += [_row(sequence, group.prompt_len, seq_len, pad_id) for sequence in group.sequences]
        rows += [_padding_row(seq_len, pad_id)] * (group_size - k)
        ranks[p, :k], valid[p, :k] = group.ranks, 1
        if group.reference_logps is not None:
            reference_logps[p, :k] = group.reference_logps
    if not rows:
        return None
    rows += [_padding_row(seq_len, pad_id)] * (num_groups * group_size - len(rows))
    batch = {key: value.reshape(num_groups, group_size, seq_len) for key, value in _stack(rows).items()}
    batch = {**batch, "ranks": ranks, "valid": valid}
    if groups[0].reference_logps is not None:
        batch["reference_logps"] = reference_logps
    return batch


def _as_preference_batch(batch: Batch | None) -> Batch | None:
    if batch is None:
        return None
    pairs = {"tokens": batch["tokens"], "mask": batch["mask"], "loss_mask": batch["loss_mask"],
             "valid": batch["valid"][:, 0]}
    if "reference_logps" in batch:
        pairs["reference_logps"] = batch["reference_logps"]
    return pairs


# Train iterators and eval batches.

def _local_rows(global_rows: int, process_count: int) -> int:
    if global_rows % process_count:
        raise ValueError(f"the batch size ({global_rows}) must be divisible by the number of processes "
                         f"({process_count})")
    return global_rows // process_count


def _train_iterator(groups: list[_Group], make_batch: Callable[[list[_Group], _Stream, int], Batch],
                    global_rows: int, seed: int, process_index: int, process_count: int) -> BatchIterator:
    local_rows = _local_rows(global_rows, process_count)
    own_groups = groups[process_index::process_count]
    if not own_groups:
        raise ValueError(f"{len(groups)} examples are too few for {process_count} processes")
    return BatchIterator(lambda stream: make_batch(own_groups, stream, local_rows), len(own_groups), seed)


def _eval_batches(groups: list[_Group], make_batch: Callable[[list[_Group], _Stream, int], Batch | None],
                  global_rows: int, process_index: int, process_count: int) -> list[Batch]:
    local_rows = _local_rows(global_rows, process_count)
    own = slice(process_index * local_rows, (process_index + 1) * local_rows)
    stream, batches = _OnceStream(len(groups)), []
    while (batch := make_batch(groups, stream, global_rows)) is not None:
        batches.append({key: value[own] for key, value in batch.items()})
    return batches


def _sft_groups(examples: Sequence[SFTExample]) -> list[tuple[str, list[str], list[int]]]:
    return [(example.prompt, [example.response], [0]) for example in examples]


def _sft_batch_maker(seq_len: int, pad_id: int, pack: bool) -> Callable[..., Batch | None]:
    build = _packed_sft_batch if pack else _sft_batch
    return lambda groups, stream, num_rows: build(groups, stream, num_rows, seq_len, pad_id)


def sft_batches(examples: Sequence[SFTExample], tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                seed: int, truncation: str = "keep_end", pack: bool = False, process_index: int = 0,
                process_count: int = 1) -> tuple[BatchIterator, TruncationStats]:
    """Endless SFT batches {'tokens', 'mask', 'loss_mask'} int32[B, L], B = batch_size / process_count.

    pack=True puts several whole examples in a row (in the shuffled order, a new row when the next
    one does not fit) and adds 'segment_ids' (1, 2, ... per row, 0 on padding) and 'positions'
    (from 0 in each example), so the model attends within each example only.
    """
    groups, stats = _encode_all(_sft_groups(examples), tokenizer, seq_len, truncation)
    return _train_iterator(groups, _sft_batch_maker(seq_len, tokenizer.pad_id, pack), batch_size, seed,
                           process_index, process_count), stats


def sft_eval_batches(examples: Sequence[SFTExample], tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                     truncation: str = "keep_end", pack: bool = False, process_index: int = 0,
                     process_count: int = 1) -> tuple[list[Batch], TruncationStats]:
    """All examples once, in order, as `sft_batches` lays them out; the last batch is padded."""
    groups, stats = _encode_all(_sft_groups(examples), tokenizer, seq_len, truncation)
    return _eval_batches(groups, _sft_batch_maker(seq_len, tokenizer.pad_id, pack), batch_size,
                         process_index, process_count), stats


def _preference_groups(examples: Sequence[PreferenceExample]) -> list[tuple[str, list[str], list[int]]]:
    return [(example.prompt, [example.chosen, example.rejected], [0, 1]) for example in examples]


def _preference_batch_maker(seq_len: int, pad_id: int) -> Callable[..., Batch | None]:
    return lambda groups, stream, num_pairs: _as_preference_batch(
        _group_batch(groups, stream, num_pairs, 2, seq_len, pad_id))


def _with_reference_logps(groups: list[_Group], reference_logps: np.ndarray | None) -> list[_Group]:
    """Attaches a [num_kept_pairs, 2] table (in the order of the kept, encoded pairs: the order
    of preference_eval_batches' valid rows) to the pairs."""
    if reference_logps is None:
        return groups
    if len(reference_logps) != len(groups):
        raise ValueError(f"reference_logps has {len(reference_logps)} rows for {len(groups)} encoded pairs")
    return [dataclasses.replace(group, reference_logps=np.asarray(row, np.float32))
            for group, row in zip(groups, reference_logps)]


def preference_batches(examples: Sequence[PreferenceExample], tokenizer: Tokenizer, *, seq_len: int,
                       batch_size: int, seed: int, truncation: str = "keep_end", process_index: int = 0,
                       process_count: int = 1,
                       reference_logps: np.ndarray | None = None) -> tuple[BatchIterator, TruncationStats]:
    """Endless pair batches: 'tokens', 'mask', 'loss_mask' int32[B, 2, L] (index 0 chosen, 1 rejected,
    both after the same prompt tokens) and 'valid' int32[B] (0 only for the eval padding pairs);
    with `reference_logps` also 'reference_logps' float32[B, 2]."""
    groups, stats = _encode_all(_preference_groups(examples), tokenizer, seq_len, truncation)
    groups = _with_reference_logps(groups, reference_logps)
    return _train_iterator(groups, _preference_batch_maker(seq_len, tokenizer.pad_id), batch_size, seed,
                           process_index, process_count), stats


def preference_eval_batches(examples: Sequence[PreferenceExample], tokenizer: Tokenizer, *, seq_len: int,
                            batch_size: int, truncation: str = "keep_end", process_index: int = 0,
                            process_count: int = 1,
                            reference_logps: np.ndarray | None = None) -> tuple[list[Batch], TruncationStats]:
    groups, stats = _encode_all(_preference_groups(examples), tokenizer, seq_len, truncation)
    groups = _with_reference_logps(groups, reference_logps)
    return _eval_batches(groups, _preference_batch_maker(seq_len, tokenizer.pad_id), batch_size,
                         process_index, process_count), stats


def _ranking_groups(examples: Sequence[RankingExample],
                    max_responses: int) -> list[tuple[str, list[str], list[int]]]:
    for i, example in enumerate(examples):
        if len(example.responses) > max_responses:
            raise ValueError(f"ranking example {i} has {len(example.responses)} responses, more than "
                             f"max_responses={max_responses}")
    return [(example.prompt, example.responses, example.ranks()) for example in examples]


def _ranking_batch_maker(seq_len: int, pad_id: int, max_responses: int) -> Callable[..., Batch | None]:
    return lambda groups, stream, num_prompts: _group_batch(groups, stream, num_prompts, max_responses,
                                                             seq_len, pad_id)


def ranking_batches(examples: Sequence[RankingExample], tokenizer: Tokenizer, *, seq_len: int,
                    prompts_per_batch: int, max_responses: int, seed: int, truncation: str = "keep_end",
                    process_index: int = 0, process_count: int = 1) -> tuple[BatchIterator, TruncationStats]:
    """Endless ranking batches: 'tokens', 'mask', 'loss_mask' int32[P, K, L], 'ranks' int32[P, K]
    (0 = best; tied scores share a rank) and 'valid' int32[P, K] (0 for the padding of prompts with
    fewer than K = max_responses responses; their ranks are 0 and mean nothing)."""
    groups, stats = _encode_all(_ranking_groups(examples, max_responses), tokenizer, seq_len, truncation)
    return _train_iterator(groups, _ranking_batch_maker(seq_len, tokenizer.pad_id, max_responses),
                           prompts_per_batch, seed, process_index, process_count), stats


def ranking_eval_batches(examples: Sequence[RankingExample], tokenizer: Tokenizer, *, seq_len: int,
                         prompts_per_batch: int, max_responses: int, truncation: str = "keep_end",
                         process_index: int = 0, process_count: int = 1) -> tuple[list[Batch], TruncationStats]:
    groups, stats = _encode_all(_ranking_groups(examples, max_responses), tokenizer, seq_len, truncation)
    return _eval_batches(groups, _ranking_batch_maker(seq_len, tokenizer.pad_id, max_responses),
                         prompts_per_batch, process_index, process_count), stats


def rankings_to_preferences(examples: Sequence[RankingExample], *, pairs: str = "all") -> list[PreferenceExample]:
    """Preference pairs from rankings: every (better, worse) pair, or only best vs worst.

    Pairs of tied responses (equal scores) or of identical texts state no preference and are skipped.
    """
    if pairs not in PAIRINGS:
        raise ValueError(f"pairs={pairs!r} is not one of {PAIRINGS}")
    preferences = []
    for example in examples:
        ranks = example.ranks()
        ordered = example.ranking if pairs == "all" else [example.ranking[0], example.ranking[-1]]
        for better, worse in itertools.combinations(ordered, 2):
            chosen, rejected = example.responses[better], example.responses[worse]
            if ranks[better] < ranks[worse] and chosen != rejected:
                preferences.append(PreferenceExample(example.prompt, chosen, rejected))
    return preferences
