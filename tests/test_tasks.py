"""Verifiable tasks: generation, splits, prompt parsing, gold reward by hand, the annotator simulator."""
import numpy as np
import pytest

from llm_jax.data import tasks


def test_examples_are_deterministic_from_the_seed_and_mix_the_tasks():
    a = tasks.make_examples(tasks.TASKS, 200, seed=3)
    assert a == tasks.make_examples(tasks.TASKS, 200, seed=3)
    assert a != tasks.make_examples(tasks.TASKS, 200, seed=4)
    assert {example.task for example in a} == set(tasks.TASKS)
    assert all(example.prompt.endswith("\n") for example in a)


def test_train_and_eval_never_share_a_prompt():
    train = tasks.make_examples(["add", "sort"], 2000, seed=0, max_digits=1, max_length=3, max_value=3)
    held_out = tasks.make_examples(["add", "sort"], 200, seed=1, split="eval", max_digits=1, max_length=3, max_value=3)
    assert len(held_out) == 200
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    assert {tasks.split_of(e.prompt) for e in held_out} == {"eval"}


def test_difficulty_knobs_shape_the_prompts():
    examples = tasks.make_examples(["sort", "reverse", "count"], 100, seed=0, min_length=7, max_length=9,
                                   max_value=99, count_letters=2)
    for example in examples:
        operand = example.prompt.split(" in ")[-1] if example.task == "count" else example.prompt.split(": ")[1]
        items = operand.split() if example.task == "sort" else operand.strip()
        assert 7 <= len(items) <= 9, example
        if example.task == "count":
            assert set(items) <= {"a", "b"}, example
    assert max(int(item) for e in examples if e.task == "sort" for item in e.answer.split()) > 9
    answers = [example.answer for example in tasks.make_examples("add", 100, seed=0, max_digits=5)]
    assert max(map(len, answers)) == 6 and min(map(len, answers)) == 1


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"\['mul'\].*subset"):
        tasks.make_examples(["add", "mul"], 1, seed=0)
    with pytest.raises(ValueError, match="split='test'"):
        tasks.make_examples("add", 1, seed=0, split="test")
    with pytest.raises(TypeError, match="max_digit"):
        tasks.make_examples("add", 1, seed=0, max_digit=3)
    with pytest.raises(ValueError, match=r"found only 0 of 1 eval prompts .* too few distinct prompts"):
        # One possible prompt, "count: a in a", which is a train prompt.
        tasks.make_examples("count", 1, seed=0, split="eval", min_length=1, max_length=1, count_letters=1)
    with pytest.raises(ValueError, match="min_length <= max_length"):
        tasks.make_examples("sort", 1, seed=0, min_length=5, max_length=2)


@pytest.mark.parametrize("prompt, task, answer", [
    ("add: 17 305\n", "add", "322"),
    ("sort: 3 10 1 2\n", "sort", "1 2 3 10"),
    ("reverse: kdwe\n", "reverse", "ewdk"),
    ("count: a in abcab\n", "count", "2"),
    ("count: z in abc", "count", "0"),  # no trailing newline: JSONL prompts may have been stripped
])
def test_prompts_parse_back_into_their_task(prompt, task, answer):
    assert tasks.parse_prompt(prompt) == tasks.TaskExample(prompt, answer, task)


def test_generated_prompts_parse_back_to_the_same_example():
    for example in tasks.make_examples(tasks.TASKS, 100, seed=5):
        assert tasks.parse_prompt(example.prompt) == example


@pytest.mark.parametrize("prompt", ["hello\n", "add: 1\n", "add: 01 2\n", "sort:\n", "count: ab in abc\n"])
def test_other_text_is_not_a_prompt(prompt):
    with pytest.raises(ValueError, match="not a task prompt"):
        tasks.parse_prompt(prompt)


@pytest.mark.parametrize("prompt, response, reward", [
    # Exact, after whitespace normalisation.
    ("add: 17 305\n", "322", 1.0),
    ("add: 17 305\n", "  322\n", 1.0),
    ("sort: 3 1 2\n", " 1  2 3 ", 1.0),
    # add: digits right, aligned from the right, of the longer number.
    ("add: 17 305\n", "312", 2 / 3),
    ("add: 17 305\n", "22", 2 / 3),
    ("add: 17 305\n", "1322", 3 / 4),
    ("add: 17 305\n", "0322", 0.0),  # not a canonical number
    ("add: 17 305\n", "three hundred", 0.0),
    # sort / reverse: positions right, of the longer.
    ("sort: 3 1 2\n", "1 3 2", 1 / 3),
    ("sort: 3 1 2\n", "1 2", 2 / 3),
    ("sort: 3 1 2\n", "1 2 3 4", 3 / 4),
    ("sort: 3 1 2\n", "1, 2, 3", 0.0),
    ("reverse: kdwe\n", "ewdx", 3 / 4),
    ("reverse: kdwe\n", "ewd", 3 / 4),
    ("reverse: kdwe\n", "ew dk", 0.0),
    ("reverse: kdwe\n", "", 0.0),
    # count: 1 - |error| / max(answer, 1), clipped.
    ("count: a in aaaab\n", "3", 3 / 4),
    ("count: a in aaaab\n", "6", 2 / 4),
    ("count: a in aaaab\n", "9", 0.0),
    ("count: c in aaaab\n", "1", 0.0),
    ("count: a in aaaab\n", "four", 0.0),
])
def test_gold_reward_by_hand(prompt, response, reward):
    assert tasks.gold_reward(prompt, response) == pytest.approx(reward)
    assert tasks.is_correct(prompt, response) == (reward == 1.0)


def test_sft_records_pair_each_prompt_with_its_answer():
    examples = tasks.make_examples(tasks.TASKS, 20, seed=0)
    records = tasks.sft_records(examples)
    assert records[0] == {"prompt": examples[0].prompt, "response": examples[0].answer}
    assert all(tasks.is_correct(r["prompt"], r["response"]) for r in records)


def test_perturbed_answers_have_mixed_quality():
    rng = np.random.default_rng(0)
    example = tasks.parse_prompt("sort: 5 3 8 1 9 2\n")
    responses = tasks.perturbed_answers(example, 50, rng=rng)
    rewards = {tasks.gold_reward(example.prompt, response) for response in responses}
    assert 1.0 in rewards and len(rewards) >= 3


def candidate_records(num_prompts, noise, seed=0):
    examples = tasks.make_examples(tasks.TASKS, num_prompts, seed=seed)
    rng = np.random.default_rng(seed)
    responses = [tasks.perturbed_answers(example, 4, rng=rng) for example in examples]
    return tasks.ranking_records([e.prompt for e in examples], responses, noise=noise, seed=seed)


def test_noiseless_annotator_ranks_by_gold_reward():
    records = candidate_records(100, noise=0.0)
    assert tasks.pairwise_agreement(records) == 1.0
    for record in records:
        rewards = [tasks.gold_reward(record["prompt"], r) for r in record["responses"]]
        assert [rewards[i] for i in record["ranking"]] == sorted(rewards, reverse=True)
        assert sorted(record["ranking"]) == list(range(4))


def test_noiseless_annotator_breaks_ties_at_random():
    rng = np.random.default_rng(0)
    rankings = {tuple(tasks.annotate("add: 1 1\n", ["2", "2", "3"], noise=0.0, rng=rng)) for _ in range(50)}
    assert rankings == {(0, 1, 2), (1, 0, 2)}


def test_annotator_agreement_falls_with_noise_to_chance():
    low, mid, high = (tasks.pairwise_agreement(candidate_records(300, noise)) for noise in (0.05, 0.5, 100.0))
    assert 1.0 > low > mid > high
    assert abs(high - 0.5) < 0.05


def test_ranking_records_are_deterministic_from_the_seed():
    assert candidate_records(20, noise=1.0, seed=2) == candidate_records(20, noise=1.0, seed=2)
    with pytest.raises(ValueError, match="noise=-1"):
        tasks.annotate("add: 1 1\n", ["2", "3"], noise=-1, rng=np.random.default_rng(0))
