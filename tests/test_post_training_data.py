"""Post-training batches: SFT loss masks, truncation policies and their stats, packing, preference
and ranking layouts, rankings -> pairs, eval padding, process shards, exact iterator resume."""
import json

import numpy as np
import pytest

from llm_jax.data import post_training as pt
from llm_jax.data import tasks
from llm_jax.data.jsonl import PreferenceExample, RankingExample, SFTExample
from llm_jax.data.tokenizer import ByteTokenizer, get_tokenizer, train_sentencepiece
from conftest import assert_same_batches, take

TOKENIZER = ByteTokenizer()
EOS = TOKENIZER.eos_id


def task_sft_examples(n, seed=0):
    return [SFTExample(r["prompt"], r["response"]) for r in tasks.sft_records(tasks.make_examples(tasks.TASKS, n, seed))]


def split_row(tokens, mask, loss_mask, tokenizer=TOKENIZER):
    """(prompt text, response token ids incl. EOS) of one unpacked row."""
    prompt_ids = tokens[(mask == 1) & (loss_mask == 0)]
    assert (loss_mask <= mask).all()
    return tokenizer.decode(prompt_ids), tokens[loss_mask == 1].tolist()




@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    """A small SentencePiece model on task text, whose pieces can span a prompt/response boundary."""
    texts = [e.prompt + e.answer for e in tasks.make_examples(tasks.TASKS, 3000, seed=9)]
    prefix = str(tmp_path_factory.mktemp("spm") / "tasks")
    return get_tokenizer("sentencepiece", train_sentencepiece(texts, vocab_size=400, output_prefix=prefix))


@pytest.mark.parametrize("pack", [False, True])
def test_sft_loss_mask_covers_exactly_the_response_and_eos(pack):
    examples = task_sft_examples(40)
    iterator, stats = pt.sft_batches(examples, TOKENIZER, seq_len=64, batch_size=8, seed=0, pack=pack)
    assert stats == pt.TruncationStats(seen=40, truncated=0, dropped=0)
    seen = set()
    for batch in take(iterator, 3):
        assert all(batch[key].dtype == np.int32 and batch[key].shape == (8, 64) for key in batch)
        segment_ids = batch["segment_ids"] if pack else batch["mask"]
        for row in range(8):
            for segment in set(segment_ids[row].tolist()) - {0}:
                in_segment = segment_ids[row] == segment
                prompt, response_ids = split_row(batch["tokens"][row][in_segment], batch["mask"][row][in_segment],
                                                 batch["loss_mask"][row][in_segment])
                assert response_ids[-1] == EOS
                seen.add((prompt, TOKENIZER.decode(response_ids[:-1])))
        assert (batch["tokens"][batch["mask"] == 0] == TOKENIZER.pad_id).all()
    assert seen <= {(e.prompt, e.response) for e in examples} and len(seen) >= 24


def test_sft_loss_mask_with_sentencepiece(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    example = SFTExample("count: a in abcab\n", "2")
    row = pt.encode_sft(tok, example, seq_len=32)
    prompt, response_ids = split_row(row["tokens"], row["mask"], row["loss_mask"], tok)
    assert (prompt, response_ids) == (example.prompt, tok.encode("2") + [tok.eos_id])
    assert row["mask"].sum() == len(tok.encode(example.prompt)) + len(response_ids)


def sft_row_text(row):
    """prompt | response, with '$' for EOS, of an encoded row."""
    prompt, response_ids = split_row(row["tokens"], row["mask"], row["loss_mask"])
    return prompt + "|" + TOKENIZER.decode(response_ids) + ("$" if response_ids[-1:] == [EOS] else "")


@pytest.mark.parametrize("truncation, prompt, response, expected", [
    # Fits: nothing changes under any policy.
    ("keep_end", "abcd", "xyz", "abcd|xyz$"),
    ("drop", "abcd", "xyz", "abcd|xyz$"),
    # 6 + 3 + EOS = 10 tokens in 8.
    ("keep_end", "abcdef", "xyz", "cdef|xyz$"),
    ("keep_start", "abcdef", "xyz", "abcdef|xy"),
    ("drop", "abcdef", "xyz", None),
    # The response alone does not fit: keep_end keeps the prompt's last token and the response's start.
    ("keep_end", "abc", "0123456789", "c|0123456"),
    ("keep_end", "", "0123456789", "0|1234567"),  # the first token is never a target
    ("keep_start", "abc", "0123456789", "abc|01234"),
    # keep_start: no room left for any response token.
    ("keep_start", "abcdefgh", "x", None),
    ("keep_end", "abcdefgh", "x", "cdefgh|x$"),
])
def test_truncation_policies(truncation, prompt, response, expected):
    row = pt.encode_sft(TOKENIZER, SFTExample(prompt, response), seq_len=8, truncation=truncation)
    assert (None if row is None else sft_row_text(row)) == expected


def test_truncation_stats_count_examples():
    examples = [SFTExample("ab", "c"), SFTExample("abcdefgh", "x"), SFTExample("abcdef", "xyz")]
    expected = {"keep_end": (3, 2, 0), "keep_start": (3, 1, 1), "drop": (3, 0, 2)}
    for truncation, (seen, truncated, dropped) in expected.items():
        _, stats = pt.sft_batches(examples, TOKENIZER, seq_len=8, batch_size=2, seed=0, truncation=truncation)
        assert stats == pt.TruncationStats(seen=seen, truncated=truncated, dropped=dropped), truncation
    with pytest.raises(ValueError, match="all 1 examples were dropped"):
        pt.sft_batches(examples[1:2], TOKENIZER, seq_len=8, batch_size=2, seed=0, truncation="drop")
    with pytest.raises(ValueError, match="truncation='left'"):
        pt.sft_batches(examples, TOKENIZER, seq_len=8, batch_size=2, seed=0, truncation="left")


def test_packing_keeps_examples_whole_with_restarting_positions():
    examples = [SFTExample(f"p{i}:", "r" * (i % 7)) for i in range(30)]  # 4 to 10 tokens each
    texts = {e.prompt + e.response for e in examples}
    iterator, _ = pt.sft_batches(examples, TOKENIZER, seq_len=24, batch_size=4, seed=1, pack=True)
    segments_in_order = []
    for batch in take(iterator, 6):
        for row in range(4):
            segment_ids, positions = batch["segment_ids"][row], batch["positions"][row]
            num_segments = segment_ids.max()
            assert num_segments >= 2, "short examples should share rows"
            real = batch["mask"][row] == 1
            assert (segment_ids[real] > 0).all() and (segment_ids[~real] == 0).all()
            # Segments 1..n in order, contiguous, each a whole example starting at position 0.
            assert (np.diff(segment_ids[real]) >= 0).all() and set(segment_ids[real]) == set(range(1, num_segments + 1))
            for segment in range(1, num_segments + 1):
                in_segment = segment_ids == segment
                np.testing.assert_array_equal(positions[in_segment], np.arange(in_segment.sum()))
                tokens = batch["tokens"][row][in_segment]
                assert tokens[-1] == EOS and TOKENIZER.decode(tokens) in texts
                segments_in_order.append(TOKENIZER.decode(tokens))
    # The first epoch is every example once.
    assert sorted(segments_in_order[:30]) == sorted(texts)


def test_packed_examples_never_target_the_next_examples_first_token():
    examples = [SFTExample("", "ab"), SFTExample("", "cd")]  # empty prompts
    [batch], _ = pt.sft_eval_batches(examples, TOKENIZER, seq_len=8, batch_size=1, pack=True)
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2, 2, 2, 0, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0, 1, 2, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0, 1, 1, 0, 0]])


def test_shuffles_each_epoch_deterministically_from_the_seed():
    examples = [SFTExample("p", str(i)) for i in range(12)]

    def epochs(seed):
        iterator, _ = pt.sft_batches(examples, TOKENIZER, seq_len=8, batch_size=4, seed=seed)
        rows = [TOKENIZER.decode(tokens[loss_mask == 1]) for batch in take(iterator, 9)
                for tokens, loss_mask in zip(batch["tokens"], batch["loss_mask"])]
        return rows[:12], rows[12:24], rows[24:]

    first, second, third = epochs(seed=0)
    assert sorted(first) == sorted(second) == sorted(third) == sorted(str(i) for i in range(12))
    assert len({tuple(first), tuple(second), tuple(third)}) == 3
    assert epochs(seed=0) == (first, second, third)
    assert epochs(seed=1)[0] != first


@pytest.mark.parametrize("make", [
    lambda: pt.sft_batches(task_sft_examples(10), TOKENIZER, seq_len=32, batch_size=4, seed=0)[0],
    lambda: pt.sft_batches(task_sft_examples(10), TOKENIZER, seq_len=48, batch_size=3, seed=0, pack=True)[0],
    lambda: pt.preference_batches([PreferenceExample("p", "a", str(i)) for i in range(7)], TOKENIZER,
                                  seq_len=8, batch_size=2, seed=0)[0],
], ids=["sft", "packed", "preference"])
def test_iterator_state_resumes_exactly_across_epochs(make):
    iterator = make()
    take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = take(iterator, 8)  # crosses at least one epoch boundary
    resumed = make()
    resumed.set_state(state)
    assert_same_batches(take(resumed, 8), expected)


def test_resuming_on_another_dataset_is_refused():
    iterator, _ = pt.sft_batches(task_sft_examples(10), TOKENIZER, seq_len=32, batch_size=4, seed=0)
    other, _ = pt.sft_batches(task_sft_examples(11), TOKENIZER, seq_len=32, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="state is for 10 examples, this dataset has 11"):
        other.set_state(iterator.get_state())


def test_preference_batches_share_the_prompt_chosen_first():
    examples = [PreferenceExample("question?", "yes", "no, because" * (i + 1)) for i in range(5)]
    iterator, stats = pt.preference_batches(examples, TOKENIZER, seq_len=32, batch_size=4, seed=0)
    assert stats.truncated > 0  # the long rejected answers cut the prompt for both
    batch = next(iterator)
    assert batch["tokens"].shape == batch["mask"].shape == batch["loss_mask"].shape == (4, 2, 32)
    np.testing.assert_array_equal(batch["valid"], np.ones(4, np.int32))
    for pair in range(4):
        chosen = split_row(*(batch[key][pair, 0] for key in ("tokens", "mask", "loss_mask")))
        rejected = split_row(*(batch[key][pair, 1] for key in ("tokens", "mask", "loss_mask")))
        assert chosen[0] == rejected[0] and "question?".endswith(chosen[0]) and chosen[0]
        assert TOKENIZER.decode(chosen[1]) == "yes" and chosen[1][-1] == EOS
        assert TOKENIZER.decode(rejected[1]).startswith("no, because")


def test_preference_eval_batches_pad_the_last_batch_and_split_by_process():
    examples = [PreferenceExample(f"p{i}", "good", "bad") for i in range(5)]
    batches, _ = pt.preference_eval_batches(examples, TOKENIZER, seq_len=12, batch_size=4)
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[1]["valid"], [1, 0, 0, 0])
    assert batches[1]["mask"][1:].sum() == 0
    prompts = [split_row(*(b[key][i, 0] for key in ("tokens", "mask", "loss_mask")))[0]
               for b in batches for i in range(4) if b["valid"][i]]
    assert prompts == [f"p{i}" for i in range(5)]  # the given order
    shards = [pt.preference_eval_batches(examples, TOKENIZER, seq_len=12, batch_size=4, process_index=p,
                                         process_count=2)[0] for p in range(2)]
    for i, batch in enumerate(batches):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([shards[0][i][key], shards[1][i][key]]), batch[key])


def test_sft_eval_batches_are_finite_in_order_and_padded():
    examples = task_sft_examples(10)
    batches, stats = pt.sft_eval_batches(examples, TOKENIZER, seq_len=32, batch_size=4)
    assert len(batches) == 3 and stats.seen == 10
    assert batches[2]["mask"][2:].sum() == 0 and batches[2]["loss_mask"][2:].sum() == 0
    texts = [split_row(b["tokens"][i], b["mask"][i], b["loss_mask"][i])[0] for b in batches for i in range(4)
             if b["mask"][i].any()]
    assert texts == [e.prompt for e in examples]
    packed, _ = pt.sft_eval_batches(examples, TOKENIZER, seq_len=64, batch_size=4, pack=True)
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in packed) == 10


def test_train_batches_shard_examples_by_process():
    examples = [SFTExample("p", str(i)) for i in range(8)]
    responses = []
    for p in range(2):
        iterator, _ = pt.sft_batches(examples, TOKENIZER, seq_len=8, batch_size=4, seed=0, process_index=p,
                                     process_count=2)
        batch = next(iterator)
        assert batch["tokens"].shape == (2, 8)
        responses.append({TOKENIZER.decode(t[m == 1]) for t, m in zip(batch["tokens"], batch["loss_mask"])})
    assert responses[0] <= {"0", "2", "4", "6"} and responses[1] <= {"1", "3", "5", "7"}
    with pytest.raises(ValueError, match="batch size \\(4\\) must be divisible by the number of processes \\(3\\)"):
        pt.sft_batches(examples, TOKENIZER, seq_len=8, batch_size=4, seed=0, process_count=3)


def test_ranking_batches_ranks_valid_and_ties():
    examples = [RankingExample("q", ["a", "b", "c"], [2, 0, 1]),
                RankingExample("r", ["w", "x", "y", "z"], [1, 0, 2, 3], scores=[1.0, 2.0, 1.0, 0.0])]
    batches, stats = pt.ranking_eval_batches(examples, TOKENIZER, seq_len=8, prompts_per_batch=2, max_responses=4)
    [batch] = batches
    assert batch["tokens"].shape == (2, 4, 8) and stats.seen == 2
    np.testing.assert_array_equal(batch["ranks"], [[1, 2, 0, 0], [1, 0, 1, 3]])
    np.testing.assert_array_equal(batch["valid"], [[1, 1, 1, 0], [1, 1, 1, 1]])
    assert batch["mask"][0, 3].sum() == 0
    for k, response in enumerate("wxyz"):
        assert split_row(batch["tokens"][1, k], batch["mask"][1, k], batch["loss_mask"][1, k]) == \
            ("r", TOKENIZER.encode(response) + [EOS])
    iterator, _ = pt.ranking_batches(examples, TOKENIZER, seq_len=8, prompts_per_batch=2, max_responses=4, seed=0)
    assert sorted(next(iterator)["valid"].sum(axis=1).tolist()) == [3, 4]
    with pytest.raises(ValueError, match="ranking example 1 has 4 responses, more than max_responses=3"):
        pt.ranking_batches(examples, TOKENIZER, seq_len=8, prompts_per_batch=2, max_responses=3, seed=0)


def test_rankings_to_preferences_pair_counts():
    four = RankingExample("p", ["a", "b", "c", "d"], [2, 0, 3, 1])
    all_pairs = pt.rankings_to_preferences([four])
    assert len(all_pairs) == 6
    assert all_pairs[0] == PreferenceExample("p", "c", "a")
    assert pt.rankings_to_preferences([four], pairs="best_worst") == [PreferenceExample("p", "c", "b")]
    tied = RankingExample("p", ["a", "b", "c"], [0, 1, 2], scores=[1.0, 1.0, 0.0])
    assert pt.rankings_to_preferences([tied]) == [PreferenceExample("p", "a", "c"), PreferenceExample("p", "b", "c")]
    all_tied = RankingExample("p", ["a", "b"], [0, 1], scores=[0.5, 0.5])
    assert pt.rankings_to_preferences([all_tied], pairs="best_worst") == []
    duplicates = RankingExample("p", ["a", "a", "b"], [0, 1, 2])
    assert len(pt.rankings_to_preferences([duplicates])) == 2  # "a" over "a" says nothing
    with pytest.raises(ValueError, match="pairs='some'"):
        pt.rankings_to_preferences([four], pairs="some")


def test_reference_logps_travel_with_their_pairs():
    """DPO's cached reference log-probs are attached per pair and follow the shuffle."""
    from llm_jax.data.jsonl import PreferenceExample
    from llm_jax.data.post_training import preference_batches, preference_eval_batches
    from llm_jax.data.tokenizer import ByteTokenizer

    examples = [PreferenceExample(f"q{i}:", f"good {i}", f"bad {i}") for i in range(5)]
    table = np.array([[-float(i), -10.0 - i] for i in range(5)], np.float32)
    tokenizer = ByteTokenizer()
    iterator, _ = preference_batches(examples, tokenizer, seq_len=16, batch_size=2, seed=3, reference_logps=table)
    for _ in range(3):
        batch = next(iterator)
        for row in range(2):
            text = tokenizer.decode(batch["tokens"][row, 0])
            i = int(text.split(":")[0][1:])
            np.testing.assert_array_equal(batch["reference_logps"][row], table[i])
    eval_batches, _ = preference_eval_batches(examples, tokenizer, seq_len=16, batch_size=4, reference_logps=table)
    np.testing.assert_array_equal(eval_batches[0]["reference_logps"], table[:4])
    np.testing.assert_array_equal(eval_batches[1]["reference_logps"][1:], 0.0)  # padding pairs
