"""Hugging Face import and export (llm_jax/convert.py, hf_models.py): exact round trips, one-line
errors for bad folders, an imported workdir that post-training starts from, and logit parity with
`transformers` on small random models of each architecture.

The parity tests need torch and transformers (the [bench] extra) and skip without them; the others
need neither: their folders are written by our own save_hf.
"""
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from llm_jax import convert, train
from llm_jax import model as model_lib
from test_tokenizer import write_hf_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_STYLES = {
    "gpt2": dict(gelu_approximate=True),
    "llama": dict(norm="rmsnorm", mlp="swiglu", positions="rope", tie_embeddings=False, use_bias=False, n_kv_heads=2,
                  rope_theta=500.0, norm_eps=1e-6),
    "bert": dict(kind="encoder", norm_position="post", embed_norm=True, type_vocab_size=2, mlm_head_transform=True,
                 norm_eps=1e-3),
}


def tiny_config(style: str, **overrides) -> model_lib.TransformerConfig:
    fields = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=4, d_ff=32, max_len=16)
    return model_lib.TransformerConfig(**{**fields, **_STYLES[style], **overrides})


def random_params(cfg, *, scale=0.5, seed=0, heads=True):
    rng = np.random.default_rng(seed)
    shapes = convert.param_shapes(cfg)
    flat = {name: (scale * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()
            if heads or not name.startswith("mlm_")}
    return traverse_util.unflatten_dict(flat, sep="/")


def assert_same_params(a, b):
    flat_a, flat_b = traverse_util.flatten_dict(a, sep="/"), traverse_util.flatten_dict(b, sep="/")
    assert sorted(flat_a) == sorted(flat_b)
    for name in flat_a:
        assert np.asarray(flat_a[name]).dtype == np.asarray(flat_b[name]).dtype, name
        assert np.array_equal(flat_a[name], flat_b[name]), name


# ---------------------------------------------------------------------------------------------
# Round trips and bad folders (numpy only)
# ---------------------------------------------------------------------------------------------

ROUND_TRIPS = {
    "gpt2": (tiny_config("gpt2"), "GPT2LMHeadModel"),
    "gpt2_untied_exact_gelu": (tiny_config("gpt2", tie_embeddings=False, gelu_approximate=False), "GPT2LMHeadModel"),
    "llama_gqa_biases": (tiny_config("llama", n_kv_heads=1, head_dim=8, use_bias=True), "LlamaForCausalLM"),
    "llama_tied": (tiny_config("llama", tie_embeddings=True), "LlamaForCausalLM"),
    "bert_mlm": (tiny_config("bert"), "BertForMaskedLM"),
    "bert_mlm_untied": (tiny_config("bert", tie_embeddings=False), "BertForMaskedLM"),
    "bert_model": (tiny_config("bert"), "BertModel"),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_export_import_round_trip_is_bit_exact(case, tmp_path):
    cfg, architecture = ROUND_TRIPS[case]
    params = random_params(cfg, heads=architecture != "BertModel")
    assert convert.save_hf(cfg, params, str(tmp_path / "a")) == architecture
    loaded_cfg, loaded = convert.load_hf(str(tmp_path / "a"))
    assert loaded_cfg == cfg
    assert_same_params(loaded, params)
    convert.save_hf(loaded_cfg, loaded, str(tmp_path / "b"))
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_sharded_and_half_precision_folders(tmp_path):
    """Shards listed by model.safetensors.index.json, fp16 tensors widened exactly to float32."""
    cfg = tiny_config("llama")
    convert.save_hf(cfg, random_params(cfg), str(tmp_path))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    os.remove(tmp_path / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard in shards.items():
        save_file({n: tensors[n].astype(np.float16) for n in shard}, str(tmp_path / file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: file for file, shard in shards.items() for n in shard}}))
    _, params = convert.load_hf(str(tmp_path))
    flat = traverse_util.flatten_dict(params, sep="/")
    assert flat["token_embed/embedding"].dtype == np.float32
    np.testing.assert_array_equal(flat["token_embed/embedding"],
                                  tensors["model.embed_tokens.weight"].astype(np.float16).astype(np.float32))
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(ValueError, match=r"index\.json lists model-00002-of-00002\.safetensors, which is missing"):
        convert.load_hf(str(tmp_path))


def _break_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _edit_tensors(folder, edit):
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _pickle_only(folder):
    os.remove(folder / "model.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")


BAD_FOLDERS = {
    "architecture": (lambda f: _break_config(f, architectures=["T5ForConditionalGeneration"]),
                     r"config\.json: architecture 'T5ForConditionalGeneration' is not supported"),
    "missing tensor": (lambda f: _edit_tensors(f, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' is missing from "),
    "shape": (lambda f: _edit_tensors(f, lambda t: t.update({"model.embed_tokens.weight": np.zeros((63, 16),
                                                                                                   np.float32)})),
              r"tensor 'model\.embed_tokens\.weight' in .*model\.safetensors has shape \(63, 16\), expected "
              r"\(64, 16\)"),
    "unexpected tensor": (lambda f: _edit_tensors(f, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias":
                                                                         np.zeros(16, np.float32)})),
                          r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias' in .*model\.safetensors"),
    "pickle only": (_pickle_only, r"holds pytorch_model\.bin \(a pickle\) but no model\.safetensors: safetensors is "
                                  r"required"),
    "rope scaling": (lambda f: _break_config(f, rope_parameters={"rope_type": "llama3", "rope_theta": 500.0}),
                     r"rope_scaling type 'llama3' is not supported"),
    "activation": (lambda f: _break_config(f, hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    "no config": (lambda f: os.remove(f / "config.json"), r"has no config\.json"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_folders_fail_in_one_line_naming_what_is_wrong(case, tmp_path):
    cfg = tiny_config("llama")
    convert.save_hf(cfg, random_params(cfg), str(tmp_path))
    damage, message = BAD_FOLDERS[case]
    damage(tmp_path)
    with pytest.raises(ValueError, match=message) as error:
        convert.load_hf(str(tmp_path))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("cfg, message", [
    (tiny_config("llama", head="scalar"), r"model\.head='scalar' \(a reward model\) has no Hugging Face counterpart"),
    (tiny_config("gpt2", positions="rope"), r"model\.norm='layernorm' has no counterpart in LlamaForCausalLM"),
    (tiny_config("gpt2", n_kv_heads=2), r"model\.n_kv_heads=2 has no counterpart in GPT2LMHeadModel"),
])
def test_export_names_what_has_no_hugging_face_counterpart(cfg, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        convert.save_hf(cfg, {}, str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The command line: import -> post-training from the workdir -> export
# ---------------------------------------------------------------------------------------------

def _finetune_config(arg: str):
    spec = importlib.util.spec_from_file_location("finetune_config", os.path.join(ROOT, "configs", "finetune.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(workdir, params): a tiny LLaMA with a tokenizer.json, imported through the command line."""
    root = tmp_path_factory.mktemp("import")
    cfg = tiny_config("llama", vocab_size=320, max_len=64)
    params = random_params(cfg, scale=0.05)
    convert.save_hf(cfg, params, str(root / "hf"))
    write_hf_tokenizer(root / "hf")
    assert convert.main(["import", f"--hf_dir={root / 'hf'}", f"--workdir={root / 'imported'}"]) == 0
    return str(root / "imported"), params


def _short_run_config(workdir: str, task: str):
    config = _finetune_config(f"init_from={workdir},task={task},steps=2")
    for key, value in {"seq_len": 48, "batch_size": 8, "num_examples": 16, "num_eval_examples": 8}.items():
        config.data[key] = value
    config.train.eval_batches, config.train.progress = 1, False
    return config


def test_imported_workdir_holds_the_weights_and_tokenizer(imported, capsys):
    workdir, params = imported
    saved = json.loads(open(os.path.join(workdir, "config.json")).read())
    assert saved["data"]["tokenizer"] == "huggingface" and saved["model"]["vocab_size"] == 320
    assert os.path.exists(os.path.join(workdir, "vocabulary.json"))
    assert_same_params(train.load_run(workdir)[1], params)
    with pytest.raises(ValueError, match=r"holds weights imported by `llm_jax\.convert import`.*init_from"):
        train.run(_short_run_config(workdir, "sft"), workdir)  # parameters only: never resumed as a run


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_post_training_starts_from_an_imported_workdir(imported, task, tmp_path):
    last = train.run(_short_run_config(imported[0], task), str(tmp_path / task))
    assert np.isfinite(last["train/loss"]) and np.isfinite(last["eval/loss"])
    if task != "sft":
        return
    out = str(tmp_path / "out")  # and back out of the SFT run, with the tokenizer
    assert convert.main(["export", f"--workdir={tmp_path / task}", f"--hf_dir={out}"]) == 0
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    exported_cfg, exported = convert.load_hf(out)
    assert exported_cfg == tiny_config("llama", vocab_size=320, max_len=64)
    assert_same_params(exported, train.load_run(str(tmp_path / task))[1])


def _abstract_and_filled(cfg, value: float):
    """Abstract parameters on one device (as restore_params wants them) and arrays all `value`."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = convert.param_shapes(cfg)
    abstract = {name: jax.ShapeDtypeStruct(shape, np.float32, sharding=device) for name, shape in shapes.items()}
    filled = {name: np.full(shape, value, np.float32) for name, shape in shapes.items()}
    return (traverse_util.unflatten_dict(tree, sep="/") for tree in (abstract, filled))


def test_reward_model_starts_from_an_imported_workdir(imported):
    """What a reward run does with train.init_from (its loop is the SFT run's): the imported body,
    no lm_head, its fresh scalar head."""
    exp = train.build_experiment(_short_run_config(imported[0], "reward"))
    abstract, fresh = _abstract_and_filled(exp.model_cfg, 7.0)
    started = traverse_util.flatten_dict(train.params_from(imported[0], fresh, abstract), sep="/")
    assert "lm_head/kernel" not in started
    np.testing.assert_array_equal(started["reward_head/kernel"], 7.0)
    np.testing.assert_array_equal(started["block_1/attn/key/kernel"], imported[1]["block_1"]["attn"]["key"]["kernel"])


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert convert.main(["import", f"--hf_dir={tmp_path}", f"--workdir={tmp_path / 'w'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no config.json" in err and err.count("\n") == 1


def test_bert_model_import_keeps_no_mlm_head_and_runs_start_one(tmp_path):
    """An imported BertModel's checkpoint holds what the folder held (exported again as a BertModel);
    an MLM run from it restores the encoder and keeps its own fresh head."""
    cfg = tiny_config("bert", vocab_size=320)
    params = random_params(cfg, heads=False)
    convert.save_hf(cfg, params, str(tmp_path / "hf"))
    assert convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "w")) == "BertModel"
    assert convert.main(["export", f"--workdir={tmp_path / 'w'}", f"--hf_dir={tmp_path / 'out'}"]) == 0
    assert_same_params(convert.load_hf(str(tmp_path / "out"))[1], params)
    abstract, fresh = _abstract_and_filled(cfg, 7.0)
    started = traverse_util.flatten_dict(train.params_from(str(tmp_path / "w"), fresh, abstract), sep="/")
    np.testing.assert_array_equal(started["mlm_transform/kernel"], 7.0)
    np.testing.assert_array_equal(started["block_1/mlp/up/kernel"], params["block_1"]["mlp"]["up"]["kernel"])


# ---------------------------------------------------------------------------------------------
# Parity with transformers (torch)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    return torch, transformers


def _hf_model(transformers, case: str):
    """Random models with large weights and perturbed norms, so that a wrong detail (GELU variant,
    epsilon, RoPE base, head grouping) moves the outputs by far more than the tolerance."""
    t = transformers
    llama = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=32, initializer_range=0.2)
    bert = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=32, initializer_range=0.2, layer_norm_eps=1e-3)
    return {
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                                       initializer_range=0.2, bos_token_id=0, eos_token_id=0)),
        "llama_tied": lambda: t.LlamaForCausalLM(t.LlamaConfig(**llama, num_key_value_heads=4, rope_theta=500.0,
                                                               tie_word_embeddings=True)),
        "llama_untied_gqa": lambda: t.LlamaForCausalLM(t.LlamaConfig(**llama, num_key_value_heads=2, rope_theta=50.0,
                                                                     tie_word_embeddings=False)),
        "bert_mlm": lambda: t.BertForMaskedLM(t.BertConfig(**bert)),
        "bert_hidden": lambda: t.BertModel(t.BertConfig(**bert)),
    }[case]()


def _outputs(torch, model, tokens, token_types, mask):
    with torch.no_grad():
        kwargs = {"token_type_ids": torch.tensor(token_types), "attention_mask": torch.tensor(mask)} \
            if token_types is not None else {}
        out = model(torch.tensor(tokens), **kwargs)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


@pytest.mark.parametrize("case", ["gpt2", "llama_tied", "llama_untied_gqa", "bert_mlm", "bert_hidden"])
def test_parity_with_transformers_both_ways(hf, case, tmp_path):
    torch, transformers = hf
    torch.manual_seed(0)
    model = _hf_model(transformers, case).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "hf"))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (2, 12))
    bert = case.startswith("bert")
    token_types = rng.integers(0, 2, (2, 12)) if bert else None
    mask = np.ones((2, 12), np.int64)
    mask[1, 9:] = 0  # padding, for BERT: compared on real tokens only
    expected = _outputs(torch, model, tokens, token_types, mask)

    cfg, params = convert.load_hf(str(tmp_path / "hf"))
    ours = np.asarray(model_lib.Transformer(cfg).apply(
        {"params": params}, tokens.astype(np.int32), mask_BxL=mask if bert else None,
        token_types_BxL=token_types, return_hidden=case == "bert_hidden"))
    real = mask.astype(bool) if bert else np.ones_like(mask, bool)
    diff = np.abs(ours - expected)[real].max()
    assert diff < 1e-4, f"{case}: max |llm_jax - transformers| = {diff:.2e}"

    convert.save_hf(cfg, params, str(tmp_path / "export"))
    reloaded = type(model).from_pretrained(str(tmp_path / "export")).eval()
    exported = _outputs(torch, reloaded, tokens, token_types, mask)
    assert np.abs(exported - expected)[real].max() < 1e-4, f"{case}: export -> from_pretrained differs"
    assert_same_params(convert.load_hf(str(tmp_path / "export"))[1], params)
    print(f"{case}: max |llm_jax - transformers| {diff:.2e}; exported {np.abs(exported - expected)[real].max():.2e}")


def test_bfloat16_sharded_checkpoint_from_transformers(hf, tmp_path):
    torch, transformers = hf
    model = _hf_model(transformers, "llama_untied_gqa").to(torch.bfloat16)
    model.save_pretrained(str(tmp_path), max_shard_size="8KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    _, params = convert.load_hf(str(tmp_path))
    np.testing.assert_array_equal(params["token_embed"]["embedding"],
                                  model.model.embed_tokens.weight.detach().float().numpy())
