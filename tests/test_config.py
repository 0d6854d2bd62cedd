"""Config validation: every bad value fails before compiling, with the field named."""
import importlib.util
import os
import subprocess
import sys

import pytest

from llm_jax import config_lib, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("overrides,field", [
    ({"mesh.data": 3}, r"mesh"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, r"-1"),
    ({"mesh.tensor": 0}, r"mesh\.tensor"),
    ({"mesh.data": 1, "mesh.fsdp": 8, "data.batch_size": 12}, r"data\.batch_size"),
    ({"optimizer.grad_accum_steps": 3}, r"optimizer\.grad_accum_steps"),
    ({"model.d_model": 60, "model.n_heads": 7}, r"model\.d_model"),
    ({"model.max_len": 16}, r"data\.seq_len"),
    ({"mesh.data": 1, "mesh.tensor": 8, "model.n_heads": 4}, r"model\.n_heads"),
    ({"mesh.data": 1, "mesh.fsdp": 8, "model.d_model": 68, "model.n_heads": 4}, r"model\.d_model"),
    ({"task": "mlm"}, r"task"),
    ({"task": "translate"}, r"task"),
    ({"data.seq_len": 0}, r"data\.seq_len"),
    ({"train.eval_batches": -1}, r"train\.eval_batches"),
    ({"data.validation_fraction": 1.5}, r"data\.validation_fraction"),
    ({"data.tokenizer": "wordpiece"}, r"data\.tokenizer"),
    ({"model.norm": "batchnorm"}, r"model\.norm"),
    ({"optimizer.schedule": "step"}, r"optimizer\.schedule"),
    ({"optimizer.warmup_steps": -1}, r"optimizer\.warmup_steps"),
])
def test_bad_values_are_named(tiny_config, overrides, field):
    config = tiny_config(**overrides)
    with pytest.raises(ValueError, match=field):
        train.build_experiment(config)


def test_valid_config_passes(tiny_config):
    train.build_experiment(tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}))


def load_job_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("name", ["quickstart", "bert_mlm"])
def test_job_configs_validate_and_take_presets(name):
    config = load_job_config(name, "size=mini,steps=50")
    assert config.model.size == "mini" and config.train.num_steps == 50
    assert config.optimizer.warmup_steps <= 5
    config_lib.validate(config, num_devices=8)
    with pytest.raises(ValueError, match="size"):
        load_job_config(name, "size=enormous")
    with pytest.raises(ValueError, match="unknown config argument"):
        load_job_config(name, "sise=mini")


@pytest.mark.parametrize("flag,message", [
    ("--config.model.d_modle=3", "d_modle"),
    ("--config.train.num_steps=abc", "num_steps"),
])
def test_command_line_typos_fail_with_the_key_named(flag, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "llm_jax.main", "--config=configs/quickstart.py", f"--workdir={tmp_path}", flag],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert not os.listdir(tmp_path)  # nothing was started
