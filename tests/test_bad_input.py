"""Bad input gets a clear one-line error naming the field, file or line, and loses nothing.

Cases covered elsewhere (not repeated here): bad config values and inconsistent meshes
(test_config.test_bad_values_are_named), a mistyped command-line value
(test_config.test_command_line_typos_fail_with_the_key_named), missing, unmatched and empty corpus
files (test_data.test_files_corpus_errors_name_the_field_and_path), malformed JSONL records
(test_jsonl), unloadable tokenizer files (test_tokenizer), a workdir of another config
(test_train_loop.test_workdir_of_another_config_is_refused), damaged checkpoints (checkpoint
verification tests).
"""
import errno
import json
import os
import random
import re
import shutil
import string
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import load_benchmark
from llm_jax import checkpoint, config_lib, main, preemption, train
from llm_jax.data import jsonl
from llm_jax.data import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# The command line: one line on stderr, exit status 1
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--config=configs/quickstart.py", "--config.model.nope=1"],
     r"flag --config\.model\.nope=1: the config has no field 'nope'"),
    (["--config=configs/quickstart.py", "--config.train.num_steps=-5"], r"train\.num_steps must be >= 1, got -5"),
])
def test_command_line_mistakes_are_one_line_errors(args, message, tmp_path):
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", main.TRACEBACK_ENV)}
    result = subprocess.run([sys.executable, "-m", "llm_jax.main", f"--workdir={workdir}", *args],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(f"error: {message}.*", lines[0]), result.stderr[-2000:]
    assert not workdir.exists()  # nothing was started


@pytest.mark.parametrize("error", [
    ValueError("data.files: cannot read '/x.txt' (Is a directory)"),
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/x.jsonl"),
    checkpoint.CheckpointSaveError("saving checkpoint 6 into /w/checkpoints failed (...); checkpoint 3 is intact"),
    FloatingPointError("non-finite loss (nan) or grad norm (nan) at step 4; the last good checkpoint is kept"),
    ValueError("first line\nsecond line"),
])
def test_main_reports_bad_input_in_one_line(error, capsys, monkeypatch):
    def runner(config, workdir):
        raise error

    monkeypatch.delenv(main.TRACEBACK_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main.run_reporting_errors(runner, None, "/w")
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    first = str(error).splitlines()[0]
    assert stderr.startswith(f"error: {first}") and stderr.count("\n") == 1, stderr
    if "\n" in str(error):
        assert f"{main.TRACEBACK_ENV}=1" in stderr

    monkeypatch.setenv(main.TRACEBACK_ENV, "1")  # the full traceback on demand
    with pytest.raises(type(error)):
        main.run_reporting_errors(runner, None, "/w")


def test_main_keeps_the_preempted_exit_status(capsys):
    def runner(config, workdir):
        raise preemption.Preempted(3, "SIGTERM")

    with pytest.raises(SystemExit) as exit_info:
        main.run_reporting_errors(runner, None, "/w")
    assert exit_info.value.code == preemption.EXIT_CODE
    assert "preempted: stopped by SIGTERM after step 3" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Config values
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    ({"task": "dpo", "dpo.reference_free": True, "dpo.loss_type": "hinge"}, r"dpo\.loss_type"),
    ({"task": "dpo", "dpo.reference_free": True, "dpo.label_smoothing": 0.5}, r"dpo\.label_smoothing"),
    ({"task": "online_dpo", "dpo.reference_free": True, "online_dpo.samples_per_prompt": 1},
     r"online_dpo\.samples_per_prompt"),
    ({"task": "online_dpo", "dpo.reference_free": True, "online_dpo.steps_per_iteration": 0},
     r"online_dpo\.steps_per_iteration"),
    ({"task": "online_dpo", "dpo.reference_free": True, "online_dpo.temperature": 0.0}, r"online_dpo\.temperature"),
    ({"task": "reward", "data.max_responses": 1}, r"data\.max_responses"),
    ({"task": "sft", "data.num_eval_examples": 0}, r"data\.num_eval_examples"),
    ({"data.max_documents": -1}, r"data\.max_documents"),
])
def test_out_of_range_values_are_named(tiny_config, overrides, field):
    with pytest.raises(ValueError, match=field):
        config_lib.validate(tiny_config(**overrides), num_devices=8)


# ---------------------------------------------------------------------------------------------
# Checkpoints of another tokenizer or architecture
# ---------------------------------------------------------------------------------------------

def train_sentencepiece(path, vocab_size, seed=0):
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7))) for _ in range(300)]
    return tokenizer_lib.train_sentencepiece([" ".join(rng.choices(words, k=2000))], vocab_size=vocab_size,
                                             output_prefix=str(path))


@pytest.fixture
def corpus_config(tiny_config, text_corpus, tmp_path):
    def make(**overrides):
        return tiny_config(**{"data.dataset": "files", "data.files": text_corpus, "data.tfds_data_dir":
                              str(tmp_path / "tfds"), "data.validation_fraction": 0.2, **overrides})
    return make


def save_checkpoint_of(config, workdir):
    """A workdir as a run of `config` leaves it after its first checkpoint, with zeros for weights
    (the shapes are what is checked), without compiling anything."""
    exp = train.build_experiment(config)
    abstract = train.state_shardings_and_init(exp, config.seed)[0]
    config_lib.check_or_write_workdir_config(config, workdir, write=True)
    manager = checkpoint.make_manager(workdir, keep=3)
    checkpoint.save(manager, 1, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract), None)
    manager.close()


def test_another_tokenizer_names_the_vocabulary_on_init_from_and_resume(corpus_config, tmp_path):
    """A run trained with a SentencePiece model of 400 pieces (table 448 rows) and then (a) used as
    train.init_from by a byte-level run (320 rows), (b) resumed after its tokenizer file was
    replaced by one of 500 pieces (512 rows), (c) resumed with data.tokenizer changed."""
    spm_path = train_sentencepiece(tmp_path / "spm" / "current", 400)
    spm_config = corpus_config(**{"data.tokenizer": "sentencepiece", "data.tokenizer_path": spm_path})
    source = str(tmp_path / "spm_run")
    save_checkpoint_of(spm_config, source)

    byte_config = corpus_config(**{"train.init_from": source})
    vocabulary = (r"the vocabulary differs: parameter \['token_embed'\]\['embedding'\] has shape \({old}, 64\) in "
                  r".* but the model expects \({new}, 64\); the tokenizer \(data\.tokenizer, data\.tokenizer_path\) "
                  r"or model\.vocab_size does not match the checkpoint's")
    with pytest.raises(ValueError, match="^train\\.init_from: " + vocabulary.format(old=448, new=320)):
        train.run(byte_config, str(tmp_path / "byte_run"))

    shutil.copy(train_sentencepiece(tmp_path / "spm" / "other", 500), spm_path)  # same path, other vocabulary
    with pytest.raises(ValueError, match="^resume: " + vocabulary.format(old=448, new=512)):
        train.run(spm_config, source)
    assert os.listdir(os.path.join(source, "checkpoints")) == ["1"]  # not set aside as damaged

    with pytest.raises(ValueError, match=r"data\.tokenizer was 'sentencepiece', now 'byte'"):
        train.run(corpus_config(), source)


def test_another_vocabulary_of_the_same_table_size_is_refused(corpus_config, tmp_path):
    """Byte-level (259 ids) and a 300-piece SentencePiece model both pad to 320 embedding rows: no
    shape differs, so the recorded vocabulary (tokenizer kind, size, file hash) must catch it."""
    spm_path = train_sentencepiece(tmp_path / "spm" / "current", 300)
    spm_config = corpus_config(**{"data.tokenizer": "sentencepiece", "data.tokenizer_path": spm_path})
    source = str(tmp_path / "spm_run")
    save_checkpoint_of(spm_config, source)
    train.check_vocabularies(spm_config, train.build_experiment(spm_config).tokenizer, source, write=True)
    assert train.build_experiment(spm_config).model_cfg.vocab_size == 320

    with pytest.raises(ValueError, match=r"^train\.init_from: .* was trained with another vocabulary \(tokenizer "
                                         r"'sentencepiece' there, 'byte' now; .*use its tokenizer"):
        train.run(corpus_config(**{"train.init_from": source}), str(tmp_path / "byte_run"))

    shutil.copy(train_sentencepiece(tmp_path / "spm" / "other", 300, seed=1), spm_path)  # same path and size
    with pytest.raises(ValueError, match=r"^resume: .* was trained with another vocabulary \(sha256 '[0-9a-f]+' "
                                         r"there, '[0-9a-f]+' now\)"):
        train.run(spm_config, source)


def test_init_from_another_architecture_names_the_parameter(corpus_config, tmp_path):
    source = str(tmp_path / "nano")
    save_checkpoint_of(corpus_config(), source)  # 2 layers, d_model 64

    def restore_into(**model):
        exp = train.build_experiment(corpus_config(**model))
        abstract = train.state_shardings_and_init(exp, 0)[0].params
        return checkpoint.restore_params(source, abstract)

    with pytest.raises(ValueError, match=r"^train\.init_from: parameter \['block_0'\]\S* has shape \(2, 32\) in .* "
                                         r"but the model expects \(2, 48\): a checkpoint of another architecture"):
        restore_into(**{"model.d_model": 96})
    with pytest.raises(ValueError, match=r"^train\.init_from: .* has parameter \['block_1'\].*, which the model "
                                         r"lacks .*another architecture"):
        restore_into(**{"model.n_layers": 1})  # a partial restore would silently keep block_0 only
    with pytest.raises(ValueError, match=r"^train\.init_from: .* has no parameter \['block_2'\]"):
        restore_into(**{"model.n_layers": 3})


# ---------------------------------------------------------------------------------------------
# A full disk while saving
# ---------------------------------------------------------------------------------------------

def test_full_disk_while_saving_keeps_the_previous_checkpoint(corpus_config, tmp_path, capsys):
    config = corpus_config(**{"train.num_steps": 2, "train.checkpoint_every": 1, "train.eval_every": 2,
                              "train.eval_batches": 1, "optimizer.warmup_steps": 1})
    workdir = str(tmp_path / "run")
    # Orbax writes its metadata through etils.epath after TensorStore wrote the arrays: the state
    # item's _METADATA of checkpoint 2 gets half written, then ENOSPC, as on a full disk.
    undo = load_benchmark("fault_child").fill_disk_during_save(2)
    try:
        with pytest.raises(checkpoint.CheckpointSaveError,
                           match=r"^saving checkpoint 2 into .*checkpoints failed \(\[Errno 28\] No space left on "
                                 r"device: .*_METADATA'\); checkpoint 1 is intact and a rerun resumes from it$"):
            train.run(config, workdir)
    finally:
        undo()
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]  # the unfinished save is gone

    exp = train.build_experiment(config)
    abstract = train.state_shardings_and_init(exp, config.seed)[0]
    manager = checkpoint.make_manager(workdir, keep=3)
    step, restored = checkpoint.restore_latest(manager, abstract, None)
    manager.close()
    assert step == 1 and int(restored["state"].step) == 1

    capsys.readouterr()
    train.run(config, workdir)  # the rerun resumes from checkpoint 1 and saves 2
    assert "resuming at step 1" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]


# ---------------------------------------------------------------------------------------------
# Workdirs and data files
# ---------------------------------------------------------------------------------------------

def test_workdir_check_names_the_fields_and_protects_only_checkpoints(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config()
    config_lib.check_or_write_workdir_config(config, workdir, write=True)
    # No checkpoint yet (the first attempt failed early, say): a corrected config may take over.
    fixed = tiny_config(**{"data.seq_len": 16})
    config_lib.check_or_write_workdir_config(fixed, workdir, write=True)

    os.makedirs(os.path.join(workdir, "checkpoints", "3"))
    other = tiny_config(**{"data.seq_len": 16, "optimizer.learning_rate": 0.5, "model.size": "micro",
                           "seed": 1, "data.batch_size": 16})
    with pytest.raises(ValueError, match=r"^workdir .* holds checkpoints of a run with a different config \("
                                         r"data\.batch_size was 8, now 16; model\.size was 'nano', now 'micro'; "
                                         r"optimizer\.learning_rate was 0\.01, now 0\.5 and 1 more\)"):
        config_lib.check_or_write_workdir_config(other, workdir, write=True)

    # A key added to base_config() after the run was written counts as its default.
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        saved = json.load(f)
    del saved["train"]["init_from"]
    with open(path, "w") as f:
        json.dump(saved, f)
    config_lib.check_or_write_workdir_config(fixed, workdir, write=False)

    os.remove(path)
    with pytest.raises(ValueError, match=r"holds checkpoints but no config\.json"):
        config_lib.check_or_write_workdir_config(fixed, workdir, write=True)


def test_jsonl_first_record_names_the_line(tmp_path):
    """The format sniffing of post-training files (first record) reports file and line as the
    readers do, for the real line number after blank lines and for bytes that are not UTF-8."""
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\n\n{\"prompt\": \"p\", \"chosen\": oops}\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: invalid JSON"):
        jsonl.first_record(path)
    path.write_bytes(b"\n{\"prompt\": \"\xff\"}\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8"):
        jsonl.first_record(path)
    path.write_text('{"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]}\n{"bad"\n')
    assert "responses" in jsonl.first_record(path)  # the later lines are the reader's business
