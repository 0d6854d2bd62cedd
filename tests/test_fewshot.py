"""Few-shot evaluation: prompt construction, demonstration draws, log-likelihood scoring against a
hand-computed forward pass, acc vs acc_norm, generation exact match and the CLI end to end."""
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llm_jax import config_lib, fewshot, train
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.model import Transformer, TransformerConfig

TASKS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "fewshot_tasks"
MC_TASK, GEN_TASK = str(TASKS / "antonyms_mc.jsonl"), str(TASKS / "first_letter_gen.jsonl")
TOK = ByteTokenizer()


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def model_and_params():
    config = config_lib.base_config()
    config.model.size = "nano"
    model = Transformer(TransformerConfig.from_config(config.model, vocab_size=TOK.vocab_size, seq_len=64))
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return model, jax.tree.map(lambda p: 4.0 * p, params)  # sharper than at init: log-probs far apart


# --------------------------------------------------------------------------------------------
# Task files and prompts
# --------------------------------------------------------------------------------------------

def test_example_task_files_read_and_infer_their_kind():
    kind, examples = fewshot.read_task(MC_TASK)
    assert kind == "multiple_choice" and len(examples) == 20
    assert examples[0] == fewshot.Example("The opposite of hot is", ("cold", "warm", "bright"), 0)
    kind, examples = fewshot.read_task(GEN_TASK)
    assert kind == "generation" and examples[0] == fewshot.Example("Word: apple\nFirst letter:", target="A")
    assert fewshot.as_task(GEN_TASK) == fewshot.TaskSpec("first_letter_gen", GEN_TASK)
    assert fewshot.as_task({"path": MC_TASK, "num_fewshot": 3, "until": "."}).until == (".",)


def test_malformed_lines_fail_with_file_and_line(tmp_path):
    good = {"context": "c", "choices": ["a", "b"], "answer": 0}
    cases = [({"context": "c", "choices": ["a", "b"], "answer": 2}, "field 'answer' must be an index"),
             ({"context": "c", "choices": ["a", "b"], "answer": True}, "field 'answer' must be an index"),
             ({"context": "c", "choices": ["a"], "answer": 0}, "at least 2"),
             ({"context": "c", "choices": ["a", 3], "answer": 0}, "item 1 must be a string"),
             ({"choices": ["a", "b"], "answer": 0}, "missing field 'context'"),
             ("{not json", "invalid JSON")]
    for i, (bad, message) in enumerate(cases):
        path = write_lines(tmp_path / f"bad{i}.jsonl", [good, "", bad])
        with pytest.raises(ValueError, match=f"bad{i}.jsonl:3: .*{message}"):
            fewshot.read_task(path)
    path = write_lines(tmp_path / "neither.jsonl", [{"context": "c", "answer": "x"}])
    with pytest.raises(ValueError, match="neither 'choices'"):
        fewshot.read_task(path)
    path = write_lines(tmp_path / "gen.jsonl", [{"context": "c", "target": "t"}, {"context": "c"}])
    with pytest.raises(ValueError, match="gen.jsonl:2: missing field 'target'"):
        fewshot.read_task(path)


def test_two_shot_prompt_is_the_exact_harness_string():
    task = fewshot.TaskSpec("t", "unused", example_separator="\n\n", target_delimiter=" ")
    demos = [fewshot.Example("Q: 1+1=", ("3", "2"), 1), fewshot.Example("Q: 2+2=", target="4")]
    query = fewshot.Example("Q: 3+3=", ("6", "7"), 0)
    assert fewshot.build_prompt(task, query, demos) == "Q: 1+1= 2\n\nQ: 2+2= 4\n\nQ: 3+3="
    other = fewshot.TaskSpec("t", "unused", example_separator="\n###\n", target_delimiter=": ")
    assert fewshot.build_prompt(other, query, demos[:1]) == "Q: 1+1=: 2\n###\nQ: 3+3="
    assert fewshot.build_prompt(task, query, []) == "Q: 3+3="
    # Through the task: with a pool of three, each 2-shot prompt holds exactly the two others.
    pool = [fewshot.Example(f"x{i} ->", target=f"y{i}") for i in range(3)]
    prompts = fewshot.fewshot_prompts(task, pool, pool, 2, seed=0, pool_is_examples=True)
    for i, prompt in enumerate(prompts):
        *shots, last = prompt.split("\n\n")
        assert last == f"x{i} ->" and sorted(shots) == [f"x{j} -> y{j}" for j in range(3) if j != i]


def test_demonstrations_exclude_the_query_and_are_seeded_and_nested():
    _, examples = fewshot.read_task(MC_TASK)
    draws = {}
    for seed in (0, 1):
        for i, query in enumerate(examples):
            for k in (0, 1, 4, 19):
                picks = fewshot.demonstration_indices(examples, query, k, seed=seed, index=i, query_index=i)
                assert len(picks) == len(set(picks)) == k and i not in picks
                draws[seed, i, k] = picks
    for i in range(len(examples)):
        assert draws[0, i, 1] == draws[0, i, 4][:1] and draws[0, i, 4] == draws[0, i, 19][:4]  # nested
        assert fewshot.demonstration_indices(examples, examples[i], 4, seed=0, index=i, query_index=i) == draws[0, i, 4]
    assert any(draws[0, i, 4] != draws[1, i, 4] for i in range(len(examples)))
    assert len({tuple(draws[0, i, 4]) for i in range(len(examples))}) > 1  # a fresh draw per example
    with pytest.raises(ValueError, match="only 19 demonstrations"):
        fewshot.demonstration_indices(examples, examples[0], 20, seed=0, index=0, query_index=0)
    # A separate pool: an entry with the query's context is never shown.
    pool = [fewshot.Example("same", target="a"), fewshot.Example("other", target="b")]
    for index in range(20):
        assert fewshot.demonstration_indices(pool, fewshot.Example("same", target="z"), 1, seed=0,
                                             index=index) == [1]
    # In-context lookup tasks keep them: the query's input must be demonstrable.
    kept = {tuple(fewshot.demonstration_indices(pool, fewshot.Example("same", target="z"), 1, seed=0, index=index,
                                                skip_query_context=False)) for index in range(20)}
    assert kept == {(0,), (1,)}
    with pytest.raises(ValueError, match="only 2 demonstrations besides the query"):
        fewshot.demonstration_indices(pool, pool[0], 3, seed=0, index=0, skip_query_context=False)


def test_encode_pair_and_left_truncation_keep_the_continuation():
    context, continuation = fewshot.encode_pair(TOK, "is ", "cold")
    assert TOK.decode(context) == "is" and TOK.decode(continuation) == " cold"  # trailing space moves
    context, continuation = fewshot.encode_pair(TOK, "", " x")
    assert context == [TOK.eos_id] and TOK.decode(continuation) == " x"
    assert fewshot.left_truncate([1, 2, 3, 4], 2) == ([3, 4], True)
    assert fewshot.left_truncate([1, 2], 2) == ([1, 2], False)
    with pytest.raises(ValueError, match="leaves 0 tokens"):
        fewshot.left_truncate([1, 2], 0)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------

def test_continuation_logps_equal_a_hand_computed_forward(model_and_params):
    model, params = model_and_params
    pairs = [("The opposite of hot is", " cold"), ("ab", " xyz, and a longer continuation to pad"),
             ("A longer context, padded less than the others: ", "ok"), ("", " start of a document here")]
    rows = [fewshot.encode_pair(TOK, c, x) for c, x in pairs]
    assert sorted({len(c) + len(x) for c, x in rows}) == [26, 27, 40, 49]  # one bucket (64), padded differently
    got = fewshot.continuation_logps(model, params, rows, pad_id=TOK.pad_id, batch_size=3)  # 2 batches
    # By hand: one unmasked forward of the rows (each padded with its own last token: a causal
    # model's logits at a position do not depend on later tokens), log-softmax, and the sum over
    # the continuation's tokens of log p(token t) read at position t - 1.
    tokens = np.array([(c + x + [x[-1]] * 64)[:64] for c, x in rows], np.int32)
    logprobs = np.asarray(jax.nn.log_softmax(jax.jit(model.apply)({"params": params}, tokens), axis=-1))
    for row, ((context, continuation), value) in enumerate(zip(rows, got)):
        targets = range(len(context), len(context) + len(continuation))
        expected = sum(logprobs[row, t - 1, tokens[row, t]] for t in targets)
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-4)
    assert len(set(np.round(got, 3))) == len(got)


def test_acc_and_acc_norm_pick_different_choices():
    # Summed: the short choice wins (-4 > -6); per character: the long one (-6/8 > -4/2).
    assert fewshot.choose([-6.0, -4.0], ["abcdefgh", "ab"]) == (1, 0)
    assert fewshot.choose([-1.0, -1.0, -5.0], ["a", "b", "ccccc"]) == (0, 0)  # ties: the first


def test_multiple_choice_rows_follow_the_scores(model_and_params, monkeypatch, capsys):
    model, params = model_and_params
    _, examples = fewshot.read_task(MC_TASK)
    rows = fewshot.evaluate_tasks(model, params, TOK, [MC_TASK], [0], limit=5)
    assert [(r["task"], r["shots"], r["metric"], r["n"], r["truncated"]) for r in rows] == [
        ("antonyms_mc", 0, "acc", 5, 0), ("antonyms_mc", 0, "acc_norm", 5, 0)]
    # The same numbers from the scorer directly.
    expected = {"acc": [], "acc_norm": []}
    for example in examples[:5]:
        lls = fewshot.continuation_logps(model, params, [fewshot.encode_pair(TOK, example.context, " " + c)
                                                         for c in example.choices])
        pick, pick_norm = fewshot.choose(lls, example.choices)
        expected["acc"].append(pick == example.answer)
        expected["acc_norm"].append(pick_norm == example.answer)
    for row in rows:
        p = np.mean(expected[row["metric"]])
        assert row["value"] == pytest.approx(p) and row["stderr"] == pytest.approx(np.sqrt(p * (1 - p) / 5))
    # 4 shots do not fit 48 tokens: prompts lose their start, the continuations stay whole.
    seen = []
    real = fewshot.continuation_logps
    monkeypatch.setattr(fewshot, "continuation_logps", lambda m, p, r, **kw: seen.extend(r) or real(m, p, r, **kw))
    rows = fewshot.evaluate_tasks(model, params, TOK, [{"path": MC_TASK, "name": "mc", "num_fewshot": [4]}],
                                  limit=3, max_len=48)
    assert {r["truncated"] for r in rows} == {3} and {r["shots"] for r in rows} == {4}
    assert "note: mc, 4-shot: 3 of 3 prompts lost their start to fit 48 tokens" in capsys.readouterr().err
    choices = [" " + c for e in examples[:3] for c in e.choices]
    assert [TOK.decode(c) for _, c in seen] == choices
    assert all(len(context) + len(continuation) == 48 for context, continuation in seen)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------

def test_stop_strings_and_exact_match():
    assert fewshot.cut_at_stops(" A\nWord: b", ["\n", "\n\n"]) == " A"
    assert fewshot.cut_at_stops("A B. C", ["\n", "."]) == "A B"
    assert fewshot.cut_at_stops("no stop", ["\n", ""]) == "no stop"
    assert fewshot.exact_match("  A ", "A") == (1, 1)
    assert fewshot.exact_match(" a", "A") == (0, 1)
    assert fewshot.exact_match("New  York", "new york") == (0, 1)


def test_generation_exact_match_with_forced_outputs(model_and_params, monkeypatch):
    model, params = model_and_params
    calls = []

    def fake_generate(model, params, tokenizer, prompts, *, max_new_tokens, batch_size, mesh):
        calls.append((prompts, max_new_tokens))
        return [" A\nWord: x", " b", " C C", "\nD", " E\n\n"]

    monkeypatch.setattr(fewshot, "greedy_generate", fake_generate)
    rows = fewshot.evaluate_tasks(model, params, TOK, [GEN_TASK], [1], limit=5)
    values = {r["metric"]: r["value"] for r in rows}
    assert values == {"exact_match": pytest.approx(2 / 5), "exact_match_norm": pytest.approx(3 / 5)}
    (prompts, max_new_tokens), = calls
    assert max_new_tokens == 2 + 8  # " A" and 8 more
    assert [TOK.decode(p).count("\n\n") for p in prompts] == [1] * 5  # one demonstration each
    assert all(TOK.decode(p).endswith(f"Word: {w}\nFirst letter:")
               for p, w in zip(prompts, ["apple", "banana", "cherry", "dog", "elephant"]))


def test_greedy_generate_pads_batches_and_cuts_eos(model_and_params):
    model, params = model_and_params
    prompts = [TOK.encode("Word: apple\nFirst letter:"), TOK.encode("ab"), TOK.encode("xyz")]
    texts = fewshot.greedy_generate(model, params, TOK, prompts, max_new_tokens=5, batch_size=2)
    single = [fewshot.greedy_generate(model, params, TOK, [p], max_new_tokens=5, batch_size=2)[0] for p in prompts]
    assert len(texts) == 3 and texts == single


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    from conftest import make_tiny_config

    tmp = tmp_path_factory.mktemp("fewshot_cli")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i, path in enumerate((MC_TASK, GEN_TASK, fewshot.__file__)):
        (corpus / f"{i}.txt").write_text(open(path).read())
    config = make_tiny_config(**{
        "data.dataset": "files", "data.files": str(corpus / "*.txt"), "data.tfds_data_dir": str(tmp / "tfds"),
        "data.validation_fraction": 0.34, "data.seq_len": 64, "train.num_steps": 2, "train.eval_every": 2,
        "train.checkpoint_every": 2, "train.eval_batches": 1, "optimizer.warmup_steps": 1,
        "train.peak_flops_per_device": 1e9})
    train.run(config, str(tmp / "run"))
    return str(tmp / "run")


def test_cli_prints_the_table_and_writes_json(trained_workdir, tmp_path, capsys):
    out = tmp_path / "results.json"
    rows = fewshot.main([f"--workdir={trained_workdir}", f"--tasks={MC_TASK},{GEN_TASK}", "--shots=0,2",
                         "--limit=4", f"--out={out}"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("|")[1:-1] == [" task             ", " shots ", " metric           ", "  value ",
                                         " stderr ", " n "]
    body = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[2:2 + 8]]
    assert [row[:3] for row in body] == [[task, shots, metric] for task, metrics in (
        ("antonyms_mc", ("acc", "acc_norm")), ("first_letter_gen", ("exact_match", "exact_match_norm")))
        for shots in ("0", "2") for metric in metrics]
    assert all(row[5] == "4" and 0 <= float(row[3]) <= 1 for row in body)
    assert lines[-1] == f"wrote {out}" and json.loads(out.read_text())["rows"] == rows
    with pytest.raises(SystemExit, match="error: --shots"):
        fewshot.main([f"--workdir={trained_workdir}", f"--tasks={MC_TASK}", "--shots=1,x"])
    with pytest.raises(SystemExit, match="error: .*nothing.jsonl: cannot read"):
        fewshot.main([f"--workdir={trained_workdir}", f"--tasks={tmp_path / 'nothing.jsonl'}"])
    assert os.path.exists(trained_workdir)


def test_pooled_rows_weight_tasks_by_their_examples():
    rows = [{"task": "a", "shots": 1, "metric": "exact_match", "value": 1.0, "stderr": 0.0, "n": 3, "truncated": 0},
            {"task": "b", "shots": 1, "metric": "exact_match", "value": 0.0, "stderr": 0.0, "n": 1, "truncated": 1},
            {"task": "a", "shots": 4, "metric": "exact_match", "value": 0.5, "stderr": 0.1, "n": 2, "truncated": 0}]
    one, four = fewshot.pooled(rows)
    assert one == {"task": "all", "shots": 1, "metric": "exact_match", "value": 0.75,
                   "stderr": pytest.approx((0.75 * 0.25 / 4) ** 0.5), "n": 4, "truncated": 1, "tasks": 2}
    assert four["value"] == 0.5 and four["n"] == 2 and four["tasks"] == 1


def test_cli_globs_tasks_sets_their_rendering_and_pools(trained_workdir, tmp_path, capsys, monkeypatch):
    for i in range(2):
        write_lines(tmp_path / f"mapping_{i}.jsonl", [{"context": "a", "target": "1"}, {"context": "b", "target": "2"}])
    seen = []
    real = fewshot.evaluate_tasks

    def spy(model, params, tokenizer, tasks, *args, **kwargs):
        seen.extend(tasks)
        return real(model, params, tokenizer, tasks, *args, **kwargs)
    monkeypatch.setattr(fewshot, "evaluate_tasks", spy)
    out = tmp_path / "r.json"
    fewshot.main([f"--workdir={trained_workdir}", f"--tasks={tmp_path}/mapping_*.jsonl", "--shots=0,1",
                  "--example_separator=\\n", "--target_delimiter=", "--keep_query_context", "--pool", f"--out={out}"])
    assert [t["path"] for t in seen] == [str(tmp_path / "mapping_0.jsonl"), str(tmp_path / "mapping_1.jsonl")]
    assert all(t["example_separator"] == "\n" and t["target_delimiter"] == "" for t in seen)
    assert all(t["skip_query_context"] is False for t in seen)
    body = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| all")]
    assert len(body) == 4  # (0, 1 shots) x (exact_match, exact_match_norm), pooled
    record = json.loads(out.read_text())
    assert len(record["rows"]) == 8 and [r["n"] for r in record["pooled"]] == [4, 4, 4, 4]
    with pytest.raises(SystemExit, match="error: --tasks: no file matches"):
        fewshot.main([f"--workdir={trained_workdir}", f"--tasks={tmp_path}/none_*.jsonl"])


def test_ideal_icl_accuracy_counts_demonstrated_queries(tmp_path):
    from llm_jax import analyze

    # Task 0 never demonstrates its query's input (two inputs, the query is not its own demo); task 1
    # always does. Labels {1, 2, 3}: an ideal learner guesses at chance 1/3 otherwise.
    write_lines(tmp_path / "t0.jsonl", [{"context": "a", "target": "1"}, {"context": "b", "target": "2"}])
    write_lines(tmp_path / "t1.jsonl", [{"context": "c", "target": "3"}, {"context": "c", "target": "3"}])
    paths = [str(tmp_path / "t0.jsonl"), str(tmp_path / "t1.jsonl")]
    assert analyze.ideal_icl_accuracy(paths, 0, seed=0) == pytest.approx(1 / 3)
    assert analyze.ideal_icl_accuracy(paths, 1, seed=0) == pytest.approx(0.5 + 0.5 / 3)


def test_analyze_icl_scores_every_run_and_plots(trained_workdir, tmp_path, capsys):
    from llm_jax import analyze
    from llm_jax.data import icl

    tasks = icl.write_tasks(str(tmp_path / "tasks"), 2, seed=0, spec=icl.MappingSpec(num_inputs=3, num_labels=4),
                            examples_per_mapping=6)
    header = "run,status,eval_loss,params_non_embedding,model.n_layers,tokens_seen,final_step,workdir"
    # A second seed of the same size (here the same workdir): the plots and the mean rows average them.
    (tmp_path / "results.csv").write_text(f"{header}\ntiny,finished,3.5,1000,1,64,2,{trained_workdir}\n"
                                          f"tiny_seed1,finished,3.25,1000,1,64,2,{trained_workdir}\n"
                                          f"broken,failed,,2000,2,,,{tmp_path}/missing\n")
    out = tmp_path / "out"
    assert analyze.main(["icl", str(tmp_path / "results.csv"), f"--out={out}", f"--tasks={tmp_path}/tasks/*.jsonl",
                         "--shots=0,2"]) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert fit["left_out"] == ["broken"] and fit["tasks"] == tasks and fit["shots"] == [0, 2]
    assert [(r["run"], r["shots"], r["n"]) for r in fit["runs"]] == [
        ("tiny", 0, 12), ("tiny", 2, 12), ("tiny_seed1", 0, 12), ("tiny_seed1", 2, 12)]
    [(tokens, loss)] = fit["eval_loss_vs_tokens"]["tiny"]  # one eval, at step 2 of 32 tokens each
    assert tokens == 64 and 0 < loss < 10
    [size] = fit["sizes"]
    assert (size["params_non_embedding"], size["seeds"]) == (1000, 2)
    assert size["accuracy"] == {str(r["shots"]): pytest.approx(r["accuracy"]) for r in fit["runs"][:2]}
    labels = {json.loads(line)["target"] for path in tasks for line in open(path)}
    assert all(0 <= r["accuracy"] <= 1 for r in fit["runs"]) and fit["ideal"]["0"] == pytest.approx(1 / len(labels))
    assert all((out / f"{name}.png").stat().st_size > 0
               for name in ("accuracy_vs_shots", "accuracy_vs_size", "eval_loss_vs_tokens"))
    text = capsys.readouterr().out
    assert "| tiny | 1,000 | 3.5000 |" in text and "| tiny_seed1 | 1,000 | 3.2500 |" in text
    assert "| mean of 2: 1k, 1 layers | 1,000 |" in text and "ideal in-context learner" in text
    assert analyze.main(["icl", str(tmp_path / "results.csv"), f"--out={out}"]) == 1
    assert "icl needs --tasks" in capsys.readouterr().err
