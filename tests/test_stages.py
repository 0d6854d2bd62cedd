"""The pipeline driver: pairs from scored samples, and every stage wired end to end (tiny)."""
import importlib.util
import json
import os

import pytest

from llm_jax import online_dpo, stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_pairs_best_worst_and_all():
    prompts = ["p"]
    responses = [["a", "b", "c", "b2"]]
    scores = [[0.5, 1.0, 0.0, 1.0]]
    best_worst = online_dpo.build_pairs(prompts, responses, scores, pairs="best_worst")
    assert [(p.chosen, p.rejected) for p in best_worst] == [("b", "c")]
    every = online_dpo.build_pairs(prompts, responses, scores, pairs="all")
    # Ties (b vs b2) make no pair: 6 pairs minus 1.
    assert sorted((p.chosen, p.rejected) for p in every) == sorted(
        [("b", "a"), ("b", "c"), ("b2", "a"), ("b2", "c"), ("a", "c")])
    assert online_dpo.build_pairs(prompts, [["x", "y"]], [[0.3, 0.3]], pairs="best_worst") == []


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_writes_the_summary(tmp_path):
    spec = importlib.util.spec_from_file_location("pipeline_config", os.path.join(ROOT, "configs", "pipeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("size=nano")
    config.unlock()
    config.data.seq_len, config.data.batch_size = 32, 8
    config.data.num_eval_examples, config.train.eval_batches, config.train.progress = 8, 1, False
    config.online_dpo.prompts_per_iteration, config.online_dpo.steps_per_iteration = 4, 1
    config.online_dpo.max_new_tokens = 4
    p = config.pipeline
    p.pretrain_dataset = "files"
    config.data.files = os.path.join(ROOT, "llm_jax", "*.py")
    config.data.tfds_data_dir = str(tmp_path / "tfds")
    config.data.validation_fraction = 0.2
    p.pretrain_steps = p.sft_steps = p.reward_steps = p.dpo_steps = 2
    p.annotated_prompts, p.max_new_tokens, p.sampling_batch_size, p.eval_samples = 8, 4, 16, 1
    p.reward_batch_size, p.dpo_batch_size, p.online_iterations = 8, 8, 1

    rows = stages.run(config, str(tmp_path / "run"))
    assert [r["stage"] for r in rows] == ["sft", "reward_model", "dpo", "online_dpo_gold",
                                          "online_dpo_reward_model"]
    with open(tmp_path / "run" / "summary.json") as f:
        saved = json.load(f)
    assert saved == rows
    for row in saved:
        assert set(row) >= {"stage", "gold_accuracy", "gold_reward", "rm_accuracy", "kl"}
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the SFT policy against itself
    print(stages.format_table(rows))
