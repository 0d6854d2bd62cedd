"""SFT, reward-model and DPO runs through the one loop, on the embedded tasks."""
import os

import jax
import numpy as np
import pytest

from llm_jax import metrics, train
from llm_jax.data import jsonl


@pytest.fixture
def post_config(tiny_config):
    def make(task, **overrides):
        config = tiny_config(**{"task": task, "data.seq_len": 48, "data.num_examples": 64,
                                "data.num_eval_examples": 16, "train.num_steps": 4,
                                "train.eval_every": 2, "train.checkpoint_every": 2, **overrides})
        return config
    return make


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
    from conftest import make_tiny_config
    workdir = str(tmp_path_factory.mktemp("sft") / "run")
    config = make_tiny_config(**{"task": "sft", "data.seq_len": 48, "data.num_examples": 64,
                                 "data.num_eval_examples": 16, "train.num_steps": 4, "train.eval_every": 2,
                                 "train.checkpoint_every": 2})
    train.run(config, workdir)
    return workdir


def rows(workdir):
    return metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))


def test_sft_trains_on_response_tokens(sft_workdir):
    logged = rows(sft_workdir)
    assert logged[0]["data/seen"] == 64 and logged[0]["data/dropped"] == 0
    train_rows = [r for r in logged if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
    assert "eval/loss" in logged[-1]


def test_sft_from_jsonl_with_packing(post_config, tmp_path):
    path = str(tmp_path / "sft.jsonl")
    jsonl.write_jsonl(path, [{"prompt": f"say {i}:", "response": f" {i * 7}"} for i in range(40)])
    config = post_config("sft", **{"data.train_file": path, "data.eval_file": path, "data.pack": True})
    last = train.run(config, str(tmp_path / "run"))
    assert np.isfinite(last["eval/loss"])


def test_dpo_cached_and_online_reference_agree(post_config, sft_workdir, tmp_path):
    """Cached reference log-probs give the same losses as running the frozen reference each step;
    at step 1 the policy is the reference, so the loss is log 2 exactly."""
    results = {}
    for reference in ("cached", "online"):
        config = post_config("dpo", **{"train.init_from": sft_workdir, "dpo.reference": reference,
                                       "optimizer.learning_rate": 1e-3})
        workdir = str(tmp_path / reference)
        train.run(config, workdir)
        results[reference] = [r for r in rows(workdir) if "train/loss" in r]
    cached, online = results["cached"], results["online"]
    assert cached[0]["train/loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert cached[0]["train/rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    for a, b in zip(cached, online):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5, abs=1e-6)
    assert cached[-1]["train/rewards/accuracy"] >= 0.0


def test_dpo_without_reference_is_a_named_error(post_config, tmp_path):
    with pytest.raises(ValueError, match=r"dpo\.reference_from"):
        train.run(post_config("dpo"), str(tmp_path / "run"))


def test_reward_model_from_sft_learns_rankings(post_config, sft_workdir, tmp_path):
    """The reward model starts from the SFT weights plus a fresh scalar head and learns the
    simulated rankings (correct answer vs corrupted ones) well above chance on held-out prompts."""
    config = post_config("reward", **{"train.init_from": sft_workdir, "train.num_steps": 30,
                                      "train.eval_every": 30, "train.checkpoint_every": 30,
                                      "optimizer.learning_rate": 3e-3, "data.annotator_noise": 0.0,
                                      "data.tasks": "count"})
    workdir = str(tmp_path / "reward")
    last = train.run(config, workdir)
    first = [r for r in rows(workdir) if "train/loss" in r][0]
    assert first["train/loss"] == pytest.approx(np.log(2), abs=1e-6)  # zero-initialised head: r = 0
    assert last["eval/accuracy"] > 0.6


def test_online_dpo_improves_gold_reward(tiny_config, tmp_path):
    """A trivially learnable task (count the letter): after a short SFT the policy's samples get
    partial credit, and online DPO with the gold scorer raises the mean gold reward."""
    from llm_jax import online_dpo

    common = {"data.seq_len": 32, "data.tasks": "count", "data.num_examples": 512, "data.batch_size": 16,
              "data.num_eval_examples": 16}
    sft = tiny_config(**{"task": "sft", "train.num_steps": 60, "train.eval_every": 60,
                         "train.checkpoint_every": 60, "optimizer.learning_rate": 3e-3, **common})
    train.run(sft, str(tmp_path / "sft"))
    config = tiny_config(**{"task": "online_dpo", "train.init_from": str(tmp_path / "sft"), "train.num_steps": 24,
                            "train.checkpoint_every": 24, "optimizer.learning_rate": 3e-3,
                            "optimizer.warmup_steps": 0, "dpo.beta": 0.1,
                            "online_dpo.steps_per_iteration": 4, "online_dpo.prompts_per_iteration": 16,
                            "online_dpo.samples_per_prompt": 4, "online_dpo.scorer": "gold",
                            "online_dpo.max_new_tokens": 4, **common})
    online_dpo.run(config, str(tmp_path / "online"))
    logged = [r for r in rows(str(tmp_path / "online")) if "online/gold_reward" in r]
    assert len(logged) == 6 and all(r["online/pairs"] > 0 for r in logged[:2])

    # Held-out prompts, 4 samples each: the online policy's mean gold reward beats the SFT policy's.
    from llm_jax import evaluation
    from llm_jax.data import tasks
    prompts = [e.prompt for e in tasks.make_examples(["count"], 64, seed=7, split="eval")] * 4
    settings = evaluation.SamplingSettings(max_new_tokens=4, batch_size=256)
    gold = {}
    for stage in ("sft", "online"):
        exp, params = train.load_run(str(tmp_path / stage))
        answers, _ = evaluation.sample_responses(exp.model, params, exp.tokenizer, prompts, settings,
                                                 rng=jax.random.key(0), mesh=exp.mesh)
        gold[stage] = evaluation.gold_scores(prompts, answers)["gold_reward"]
    assert gold["online"] > gold["sft"] + 0.02, gold
