"""JSONL datasets for post-training, in the formats TRL users know; one JSON object per line.

SFT:          {"prompt": str, "response": str}
Preferences:  {"prompt": str, "chosen": str, "rejected": str}
Rankings:     {"prompt": str, "responses": [str, ...], "ranking": [int, ...]}   (K >= 2 responses,
              ranking = the indices of the responses, best first)
          or  {"prompt": str, "responses": [str, ...], "scores": [float, ...]}  (higher is better)

Scores may tie: tied responses share a rank (`RankingExample.ranks`), so a tie makes no preference
pair. Keys other than these are ignored (datasets often carry ids or sources). Blank lines are
skipped. Every malformed record fails with `ValueError("<path>:<line>: <what is wrong>")`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, Union

ExampleT = TypeVar("ExampleT")


@dataclasses.dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str


@dataclasses.dataclass(frozen=True)
class RankingExample:
    """K >= 2 responses to one prompt and their order of preference.

    `ranking` holds response indices, best first. Read from scores, it sorts the responses by score
    (highest first, tied responses in index order) and `scores` keeps the scores, so that ties stay
    visible to `ranks()`.
    """

    prompt: str
    responses: list[str]
    ranking: list[int]
    scores: list[float] | None = None

    def ranks(self) -> list[int]:
        """Each response's rank, 0 = best: how many responses are strictly better (ties share one).
        Identical answers are tied at the better one's rank: a rater who orders two copies of one
        answer states no preference (sampled answers repeat often)."""
        if self.scores is None:
            ranks = [0] * len(self.responses)
            for position, index in enumerate(self.ranking):
                ranks[index] = position
        else:
            ranks = [sum(other > score for other in self.scores) for score in self.scores]
        best_rank_of_text: dict[str, int] = {}
        for text, rank in zip(self.responses, ranks):
            best_rank_of_text[text] = min(rank, best_rank_of_text.get(text, rank))
        return [best_rank_of_text[text] for text in self.responses]


AnyExample = Union[SFTExample, PreferenceExample, RankingExample]


def read_sft(path: str | os.PathLike) -> list[SFTExample]:
    return read_records(path, _parse_sft)


def read_preferences(path: str | os.PathLike) -> list[PreferenceExample]:
    return read_records(path, _parse_preference)


def read_rankings(path: str | os.PathLike) -> list[RankingExample]:
    return read_records(path, _parse_ranking)


def first_record(path: str | os.PathLike) -> dict:
    """The first record of a file as a JSON object (to tell its format), failing as the readers do:
    `<path>:<line>: ...` for a malformed line, `<path>: ...` for an unreadable or empty file."""
    return read_records(path, lambda record: record, limit=1)[0]


def as_record(example: AnyExample | Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object of an example (a mapping is passed through); the inverse of the readers."""
    if isinstance(example, Mapping):
        return dict(example)
    if isinstance(example, RankingExample):
        order = {"scores": example.scores} if example.scores is not None else {"ranking": example.ranking}
        return {"prompt": example.prompt, "responses": example.responses, **order}
    return dataclasses.asdict(example)


def write_jsonl(path: str | os.PathLike, records: Iterable[AnyExample | Mapping[str, Any]]) -> int:
    """Writes one JSON object per record (dicts or examples); returns how many.

    Atomic: a reader sees the old file or the whole new one, never a partial write. NaN and
    infinities are refused, since JSON has no such numbers.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # A temp name of our own (not tempfile's) so the file gets the usual umask permissions.
    temp_path = f"{path}.tmp{os.getpid()}"
    count = 0
    try:
        with open(temp_path, "x", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(as_record(record), ensure_ascii=False, allow_nan=False) + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise
    return count


def read_records(path: str | os.PathLike, parse: Callable[[dict], ExampleT], limit: int = 0) -> list[ExampleT]:
    """`parse(record)` of each JSON object line (blank lines skipped; the first `limit` if > 0).
    Errors name the file, and the line: `<path>:<line>: <what parse or JSON said>`."""
    path = os.fspath(path)
    examples = []
    try:
        with open(path, "rb") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                if limit and len(examples) == limit:
                    break
                try:
                    examples.append(parse(_json_object(line)))
                except ValueError as e:
                    raise ValueError(f"{path}:{line_number}: {e}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the file ({e.strerror})") from None
    if not examples:
        raise ValueError(f"{path}: no records (the file is empty)")
    return examples


def _json_object(line: bytes) -> dict:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {_json_type(value)}")
    return value


def _parse_sft(record: dict) -> SFTExample:
    return SFTExample(prompt=string_field(record, "prompt"), response=string_field(record, "response"))


def _parse_preference(record: dict) -> PreferenceExample:
    example = PreferenceExample(prompt=string_field(record, "prompt"), chosen=string_field(record, "chosen"),
                                rejected=string_field(record, "rejected"))
    if example.chosen == example.rejected:
        raise ValueError("'chosen' and 'rejected' are the same text, which states no preference")
    return example


def _parse_ranking(record: dict) -> RankingExample:
    prompt = string_field(record, "prompt")
    responses = list_field(record, "responses", str, "string")
    if not responses:
        raise ValueError("field 'responses' is empty")
    if len(responses) < 2:
        raise ValueError("field 'responses' has 1 response; a ranking needs at least 2")
    if ("ranking" in record) == ("scores" in record):
        raise ValueError("give exactly one of the fields 'ranking' and 'scores'")
    if "ranking" in record:
        return RankingExample(prompt, responses, _ranking(record, len(responses)))
    scores = _scores(record, len(responses))
    ranking = sorted(range(len(responses)), key=lambda i: -scores[i])  # stable: ties in index order
    return RankingExample(prompt, responses, ranking, scores)


def _ranking(record: dict, num_responses: int) -> list[int]:
    ranking = list_field(record, "ranking", int, "integer")
    if sorted(ranking) != list(range(num_responses)):
        raise ValueError(f"field 'ranking' {ranking} is not a permutation of the response indices "
                         f"0..{num_responses - 1}")
    return ranking


def _scores(record: dict, num_responses: int) -> list[float]:
    scores = list_field(record, "scores", (int, float), "number")
    if len(scores) != num_responses:
        raise ValueError(f"field 'scores' has {len(scores)} scores for {num_responses} responses")
    if not all(math.isfinite(score) for score in scores):
        raise ValueError(f"field 'scores' {scores} holds a non-finite number")
    return [float(score) for score in scores]


def string_field(record: dict, key: str) -> str:
    """`record[key]`, which must be a string (ValueError naming the field otherwise)."""
    value = required_field(record, key)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {_json_type(value)}")
    return value


def list_field(record: dict, key: str, item_type: type | tuple[type, ...], item_name: str) -> list:
    """`record[key]`, which must be an array of `item_type` (ValueError naming the field otherwise)."""
    value = required_field(record, key)
    if not isinstance(value, list):
        raise ValueError(f"field {key!r} must be an array of {item_name}s, got {_json_type(value)}")
    for i, item in enumerate(value):
        # bool is an int subclass in Python, but true/false is not a number in JSON.
        if isinstance(item, bool) or not isinstance(item, item_type):
            article = "an" if item_name[0] in "aeiou" else "a"
            raise ValueError(f"field {key!r}: item {i} must be {article} {item_name}, got {_json_type(item)}")
    return value


def required_field(record: dict, key: str) -> Any:
    """`record[key]`; a missing field is a ValueError naming it."""
    if key not in record:
        raise ValueError(f"missing field {key!r}")
    return record[key]


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {str: "a string", int: "a number", float: "a number", list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)
