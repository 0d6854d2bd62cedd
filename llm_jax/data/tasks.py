"""Verifiable instruction tasks, generated offline, whose answers a program checks.

Prompts are short plain text for a byte-level tokenizer and small models; each ends in a newline
after which the answer follows:

    add: 17 305\n          -> 322
    sort: 3 1 2\n          -> 1 2 3
    reverse: kdwe\n        -> ewdk
    count: a in abcab\n    -> 2

A prompt parses back into its task (`parse_prompt`), so `gold_reward(prompt, response)` needs
nothing else and works on any JSONL made from these prompts. The train and eval sets are disjoint:
a hash of the prompt decides its split, whatever the seed or difficulty.

The annotator simulator ranks K responses the way a noisy human rater would (InstructGPT's data
collection): by gold reward plus Gumbel noise of scale `noise`, which draws the order from a
Plackett-Luce model with weights exp(reward / noise).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

TASKS = ("add", "sort", "reverse", "count")
SPLITS = ("train", "eval")
# The share of all possible prompts held out for evaluation.
EVAL_FRACTION = 0.1
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_NUMBER = r"0|[1-9][0-9]*"  # canonical decimal: "07" is not an answer
_NUMBER_RE = re.compile(_NUMBER)
_WORD_RE = re.compile(r"[A-Za-z]+")
_PROMPT_RES = {
    "add": re.compile(rf"add: ({_NUMBER}) ({_NUMBER})"),
    "sort": re.compile(rf"sort: ((?:{_NUMBER})(?: (?:{_NUMBER}))*)"),
    "reverse": re.compile(r"reverse: ([a-z]+)"),
    "count": re.compile(r"count: ([a-z]) in ([a-z]+)"),
}


@dataclasses.dataclass(frozen=True)
class TaskExample:
    prompt: str
    answer: str
    task: str


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """The knobs of `make_examples`; each applies to the tasks named in its comment."""

    max_digits: int = 3  # add: each operand has 1..max_digits digits
    min_length: int = 2  # sort: list length; reverse, count: string length
    max_length: int = 6
    max_value: int = 9  # sort: items are 0..max_value
    count_letters: int = 3  # count: strings over the first count_letters letters, so counts vary

    def __post_init__(self):
        if not 1 <= self.max_digits <= 18:  # operands stay within int64
            raise ValueError(f"max_digits={self.max_digits} must be in 1..18")
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"need 1 <= min_length <= max_length, got {self.min_length}, {self.max_length}")
        if self.max_value < 0:
            raise ValueError(f"max_value={self.max_value} must be >= 0")
        if not 1 <= self.count_letters <= len(_LETTERS):
            raise ValueError(f"count_letters={self.count_letters} must be in 1..{len(_LETTERS)}")


def parse_prompt(prompt: str) -> TaskExample:
    """The task a prompt states and its correct answer; ValueError for any other text."""
    text = prompt.strip()
    for task, pattern in _PROMPT_RES.items():
        match = pattern.fullmatch(text)
        if match:
            return TaskExample(prompt=prompt, answer=_SOLVERS[task](*match.groups()), task=task)
    raise ValueError(f"not a task prompt (one of {TASKS}): {prompt!r}")


def split_of(prompt: str) -> str:
    """'eval' for a fixed EVAL_FRACTION of all prompts (by a hash, stable across runs), else 'train'."""
    digest = hashlib.sha256(prompt.strip().encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") < EVAL_FRACTION * 2**64 else "train"


def make_examples(task_names: str | Sequence[str], n: int, seed: int, *, split: str = "train",
                  **difficulty) -> list[TaskExample]:
    """`n` examples of the named tasks (each drawn uniformly), deterministic from `seed`.

    Prompts are drawn until `n` of them fall in `split`, so train and eval never share a prompt.
    Duplicates can occur when the difficulty allows few distinct prompts. `difficulty` holds
    `Difficulty` fields.
    """
    task_names = (task_names,) if isinstance(task_names, str) else tuple(task_names)
    unknown = [name for name in task_names if name not in TASKS]
    if unknown or not task_names:
        raise ValueError(f"task names {unknown or list(task_names)} are not a non-empty subset of {TASKS}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    knobs = Difficulty(**difficulty)
    rng = np.random.default_rng(seed)
    examples = []
    # Enough draws for any split holding a fair share of the prompts; a difficulty that allows
    # (almost) no prompt in the split fails instead of looping forever.
    max_draws, draws = 1000 + int(100 * n / EVAL_FRACTION), 0
    while len(examples) < n:
        if draws == max_draws:
            raise ValueError(f"found only {len(examples)} of {n} {split} prompts for {task_names} in "
                             f"{max_draws} draws: {knobs} allows too few distinct prompts")
        draws += 1
        task = task_names[rng.integers(len(task_names))]
        prompt = _GENERATORS[task](rng, knobs)
        if split_of(prompt) == split:
            examples.append(parse_prompt(prompt))
    return examples


def gold_reward(prompt: str, response: str) -> float:
    """1.0 for the exact answer, partial credit in [0, 1) otherwise, 0.0 for an unparseable response.

    Whitespace is normalised first (ends stripped, runs collapsed to one space). Partial credit:
    add -- the share of digits right, aligned from the right; sort, reverse -- the share of
    positions right (of the longer of answer and response); count -- 1 - |error| / max(answer, 1),
    clipped at 0. Responses must be in the answer's format (canonical numbers, letters only).
    """
    example = parse_prompt(prompt)
    response = " ".join(response.split())
    if response == example.answer:
        return 1.0
    return _PARTIAL_CREDIT[example.task](example.answer, response)


def is_correct(prompt: str, response: str) -> bool:
    return gold_reward(prompt, response) == 1.0


def sft_records(examples: Iterable[TaskExample]) -> list[dict[str, str]]:
    """SFT JSONL records: the prompt and its correct answer."""
    return [{"prompt": example.prompt, "response": example.answer} for example in examples]


def perturbed_answers(example: TaskExample, k: int, *, rng: np.random.Generator,
                      max_edits: int = 2) -> list[str]:
    """`k` candidate responses of mixed quality, for ranking data before any model can sample.

    Each is the answer with 0..max_edits random units (numbers for sort, characters otherwise)
    replaced by plausible ones (the prompt's own numbers or letters, digits).
    """
    separator = " " if example.task == "sort" else ""
    units = example.answer.split(" ") if example.task == "sort" else list(example.answer)
    pool = _edit_pool(example)
    responses = []
    for _ in range(k):
        edited = list(units)
        for _ in range(rng.integers(max_edits + 1)):
            edited[rng.integers(len(edited))] = pool[rng.integers(len(pool))]
        responses.append(separator.join(edited))
    return responses


def annotate(prompt: str, responses: Sequence[str], *, noise: float, rng: np.random.Generator) -> list[int]:
    """A simulated rater's ranking of `responses` (indices, best first).

    Sorts by gold reward + Gumbel(scale=noise); noise=0 ranks exactly by gold reward (ties in a
    random order) and a large noise ranks nearly at random.
    """
    if noise < 0:
        raise ValueError(f"noise={noise} must be >= 0")
    utilities = np.array([gold_reward(prompt, response) for response in responses])
    utilities += noise * rng.gumbel(size=len(responses))
    tie_breaks = rng.random(len(responses))
    # lexsort sorts by its last key first.
    return np.lexsort((tie_breaks, -utilities)).tolist()


def ranking_records(prompts: Sequence[str], responses_per_prompt: Sequence[Sequence[str]], *,
                    noise: float, seed: int) -> list[dict[str, Any]]:
    """Ranking JSONL records ({"prompt", "responses", "ranking"}) ranked by `annotate`."""
    if len(prompts) != len(responses_per_prompt):
        raise ValueError(f"{len(prompts)} prompts but {len(responses_per_prompt)} lists of responses")
    rng = np.random.default_rng(seed)
    return [{"prompt": prompt, "responses": list(responses),
             "ranking": annotate(prompt, responses, noise=noise, rng=rng)}
            for prompt, responses in zip(prompts, responses_per_prompt)]


def pairwise_agreement(records: Iterable[Mapping[str, Any]]) -> float:
    """How often ranking records order two responses as gold reward does.

    Counts every pair of responses to a prompt whose gold rewards differ; NaN when there is none.
    """
    agreed = total = 0
    for record in records:
        rewards = [gold_reward(record["prompt"], response) for response in record["responses"]]
        position = {index: place for place, index in enumerate(record["ranking"])}
        for i, j in itertools.combinations(range(len(rewards)), 2):
            if rewards[i] != rewards[j]:
                total += 1
                agreed += (rewards[i] > rewards[j]) == (position[i] < position[j])
    return agreed / total if total else float("nan")


# Generators: a random prompt of each task.

def _random_number(rng: np.random.Generator, max_digits: int) -> int:
    # The digit count first, so short numbers are as common as long ones.
    digits = int(rng.integers(1, max_digits + 1))
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(low, 10**digits))


def _random_letters(rng: np.random.Generator, alphabet: str, knobs: Difficulty) -> str:
    length = rng.integers(knobs.min_length, knobs.max_length + 1)
    return "".join(alphabet[i] for i in rng.integers(len(alphabet), size=length))


def _make_add(rng: np.random.Generator, knobs: Difficulty) -> str:
    return f"add: {_random_number(rng, knobs.max_digits)} {_random_number(rng, knobs.max_digits)}\n"


def _make_sort(rng: np.random.Generator, knobs: Difficulty) -> str:
    length = rng.integers(knobs.min_length, knobs.max_length + 1)
    return f"sort: {' '.join(map(str, rng.integers(knobs.max_value + 1, size=length)))}\n"


def _make_reverse(rng: np.random.Generator, knobs: Difficulty) -> str:
    return f"reverse: {_random_letters(rng, _LETTERS, knobs)}\n"


def _make_count(rng: np.random.Generator, knobs: Difficulty) -> str:
    alphabet = _LETTERS[: knobs.count_letters]
    letter = alphabet[rng.integers(len(alphabet))]
    return f"count: {letter} in {_random_letters(rng, alphabet, knobs)}\n"


_GENERATORS: dict[str, Callable[[np.random.Generator, Difficulty], str]] = {
    "add": _make_add, "sort": _make_sort, "reverse": _make_reverse, "count": _make_count,
}

# Solvers: the answer from the groups of the prompt's pattern.
_SOLVERS: dict[str, Callable[..., str]] = {
    "add": lambda a, b: str(int(a) + int(b)),
    "sort": lambda items: " ".join(sorted(items.split(" "), key=int)),
    "reverse": lambda text: text[::-1],
    "count": lambda letter, text: str(text.count(letter)),
}


# Partial credit for a response that is not the exact answer.

def _positions_right(answer: Sequence, response: Sequence) -> float:
    matches = sum(a == r for a, r in zip(answer, response))
    return matches / max(len(answer), len(response))


def _add_credit(answer: str, response: str) -> float:
    if not _NUMBER_RE.fullmatch(response):
        return 0.0
    return _positions_right(answer[::-1], response[::-1])


def _sort_credit(answer: str, response: str) -> float:
    items = response.split(" ")
    if not all(_NUMBER_RE.fullmatch(item) for item in items):
        return 0.0
    return _positions_right(answer.split(" "), items)


def _reverse_credit(answer: str, response: str) -> float:
    if not _WORD_RE.fullmatch(response):
        return 0.0
    return _positions_right(answer, response)


def _count_credit(answer: str, response: str) -> float:
    if not _NUMBER_RE.fullmatch(response):
        return 0.0
    return max(0.0, 1.0 - abs(int(response) - int(answer)) / max(int(answer), 1))


_PARTIAL_CREDIT: dict[str, Callable[[str, str], float]] = {
    "add": _add_credit, "sort": _sort_credit, "reverse": _reverse_credit, "count": _count_credit,
}


def _edit_pool(example: TaskExample) -> list[str]:
    """Replacement units for `perturbed_answers`: what a wrong answer plausibly contains."""
    if example.task == "sort":
        return example.answer.split(" ") + [str(d) for d in range(10)]
    if example.task == "reverse":
        return list(example.answer)
    return list("0123456789")
