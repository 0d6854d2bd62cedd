"""JSONL readers and writer: the TRL formats, file:line errors naming the problem, round trips."""
import json
import os
import re

import pytest

from llm_jax.data import jsonl
from llm_jax.data.jsonl import PreferenceExample, RankingExample, SFTExample


def write_lines(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_reads_each_format_skipping_blank_lines_and_extra_keys(tmp_path):
    sft = write_lines(tmp_path, ['{"prompt": "p", "response": "r", "id": 7}', "", "  ",
                                 '{"prompt": "", "response": "é"}'], "sft.jsonl")
    assert jsonl.read_sft(sft) == [SFTExample("p", "r"), SFTExample("", "é")]
    pairs = write_lines(tmp_path, ['{"prompt": "p", "chosen": "a", "rejected": "b"}'], "pairs.jsonl")
    assert jsonl.read_preferences(pairs) == [PreferenceExample("p", "a", "b")]
    rankings = write_lines(tmp_path, ['{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}'],
                           "rankings.jsonl")
    [example] = jsonl.read_rankings(rankings)
    assert example == RankingExample("p", ["a", "b", "c"], [2, 0, 1])
    assert example.ranks() == [1, 2, 0]


def test_scores_become_a_ranking_and_ties_share_a_rank(tmp_path):
    path = write_lines(tmp_path, ['{"prompt": "p", "responses": ["a", "b", "c", "d"], "scores": [0.5, 2, 0.5, -1]}'])
    [example] = jsonl.read_rankings(path)
    assert example.ranking == [1, 0, 2, 3]  # highest first, the tie in index order
    assert example.scores == [0.5, 2.0, 0.5, -1.0]
    assert example.ranks() == [1, 0, 1, 3]  # "a" and "c" tie: neither is preferred


SFT_ERRORS = [
    ("{not json", r"invalid JSON"),
    ('["prompt", "response"]', r"expected a JSON object, got an array"),
    ('{"prompt": "p"}', r"missing field 'response'"),
    ('{"prompt": 3, "response": "r"}', r"field 'prompt' must be a string, got a number"),
    ('{"prompt": "p", "response": null}', r"field 'response' must be a string, got null"),
]
PREFERENCE_ERRORS = [
    ('{"prompt": "p", "chosen": "a"}', r"missing field 'rejected'"),
    ('{"prompt": "p", "chosen": ["a"], "rejected": "b"}', r"field 'chosen' must be a string, got an array"),
    ('{"prompt": "p", "chosen": "a", "rejected": "a"}', r"'chosen' and 'rejected' are the same text"),
]
RANKING_ERRORS = [
    ('{"prompt": "p", "ranking": [0, 1]}', r"missing field 'responses'"),
    ('{"prompt": "p", "responses": "ab", "ranking": [0, 1]}', r"'responses' must be an array of strings"),
    ('{"prompt": "p", "responses": ["a", 1], "ranking": [0, 1]}', r"'responses': item 1 must be a string"),
    ('{"prompt": "p", "responses": [], "ranking": []}', r"field 'responses' is empty"),
    ('{"prompt": "p", "responses": ["a"], "ranking": [0]}', r"at least 2"),
    ('{"prompt": "p", "responses": ["a", "b"]}', r"exactly one of the fields 'ranking' and 'scores'"),
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1], "scores": [1, 0]}', r"exactly one"),
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}', r"'ranking' \[0, 0\] is not a permutation"),
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 2]}', r"not a permutation of the response indices 0..1"),
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0]}', r"not a permutation"),
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [true, false]}', r"item 0 must be an integer, got a boolean"),
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0.0, 1]}', r"item 0 must be an integer, got a number"),
    ('{"prompt": "p", "responses": ["a", "b"], "scores": [1]}', r"'scores' has 1 scores for 2 responses"),
    ('{"prompt": "p", "responses": ["a", "b"], "scores": [1, NaN]}', r"non-finite"),
    ('{"prompt": "p", "responses": ["a", "b"], "scores": [1, Infinity]}', r"non-finite"),
    ('{"prompt": "p", "responses": ["a", "b"], "scores": [1, "2"]}', r"'scores': item 1 must be a number, got a string"),
]


@pytest.mark.parametrize("reader, line, message", [
    *[(jsonl.read_sft, line, message) for line, message in SFT_ERRORS],
    *[(jsonl.read_preferences, line, message) for line, message in PREFERENCE_ERRORS],
    *[(jsonl.read_rankings, line, message) for line, message in RANKING_ERRORS],
])
def test_malformed_records_name_file_line_and_problem(tmp_path, reader, line, message):
    good = {jsonl.read_sft: '{"prompt": "p", "response": "r"}',
            jsonl.read_preferences: '{"prompt": "p", "chosen": "a", "rejected": "b"}',
            jsonl.read_rankings: '{"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]}'}[reader]
    path = write_lines(tmp_path, [good, "", line, good])  # the bad record is on line 3
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}:3: .*{message}") as error:
        reader(path)
    assert "\n" not in str(error.value)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": "\xff", "response": "r"}\n')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8"):
        jsonl.read_sft(path)


def test_missing_and_empty_files_give_one_line_naming_the_file(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=rf"^{re.escape(missing)}: cannot read the file \(No such file or directory\)$"):
        jsonl.read_sft(missing)
    empty = write_lines(tmp_path, ["", "   "], "empty.jsonl")
    with pytest.raises(ValueError, match=rf"^{re.escape(empty)}: no records \(the file is empty\)$"):
        jsonl.read_preferences(empty)


def test_write_then_read_round_trips_examples_and_dicts(tmp_path):
    sft = [SFTExample("add: 1 2\n", "3"), SFTExample("naïve 🙂", "")]
    path = tmp_path / "nested" / "sft.jsonl"
    assert jsonl.write_jsonl(path, sft) == 2
    assert jsonl.read_sft(path) == sft

    rankings = [RankingExample("p", ["a", "b", "c"], [2, 0, 1]),
                RankingExample("q", ["x", "y"], [1, 0], scores=[0.0, 1.5])]
    jsonl.write_jsonl(tmp_path / "rankings.jsonl", rankings)
    assert jsonl.read_rankings(tmp_path / "rankings.jsonl") == rankings
    assert "ranking" not in json.loads((tmp_path / "rankings.jsonl").read_text().splitlines()[1])

    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    jsonl.write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert jsonl.read_preferences(tmp_path / "pairs.jsonl") == [PreferenceExample("p", "a", "b")]


def test_write_is_atomic_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "sft.jsonl"
    jsonl.write_jsonl(path, [SFTExample("p", "old")])
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        jsonl.write_jsonl(path, [{"prompt": "p", "response": "new"}, {"score": float("nan")}])
    assert jsonl.read_sft(path) == [SFTExample("p", "old")]
    assert os.listdir(tmp_path) == ["sft.jsonl"]  # no temp file left behind


def test_identical_answers_are_tied_in_ranks():
    from llm_jax.data.jsonl import RankingExample

    example = RankingExample("q", ["a", "b", "a", "c"], ranking=[1, 2, 0, 3])
    assert example.ranks() == [1, 0, 1, 3]  # "b" best; both copies of "a" share the better copy's rank
