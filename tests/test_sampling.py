"""KV-cache sampling: the cache reproduces full forward passes, the filters keep only what they
should, seeds reproduce, EOS stops a row, sharded == single device, and the CLI end to end."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llm_jax import config_lib, sample, sampling, sharding, train
from llm_jax.model import Transformer, TransformerConfig, init_cache

# Different lengths in one batch; bucket 8 pads them to 8 and left-padding varies per row.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
BUCKET = 8
NEW = 8
STYLES = {"gpt2": {}, "llama": {"n_kv_heads": 1}}  # learned positions; RoPE + grouped-query attention


def make_model(style, **overrides):
    config = config_lib.base_config()
    config.model.style = style
    config.model.update({**STYLES[style], **overrides})
    return Transformer(TransformerConfig.from_config(config.model, vocab_size=259, seq_len=32))


def init_boxed(model):
    return jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]


def sharpen(params):
    """Larger weights than at initialisation, so that greedy decoding is not "repeat the last token"."""
    return jax.tree.map(lambda p: 8.0 * p, params)


@pytest.fixture(scope="module", params=sorted(STYLES))
def model_and_params(request):
    model = make_model(request.param)
    return model, sharpen(nn.unbox(init_boxed(model)))


def full_forward_logprobs(model, params, sequences):
    """Log-softmax of one ordinary (uncached) forward pass over right-padded sequences."""
    width = max(map(len, sequences))
    tokens = np.zeros((len(sequences), width), np.int32)
    mask = np.zeros_like(tokens)
    for row, seq in enumerate(sequences):
        tokens[row, :len(seq)], mask[row, :len(seq)] = seq, 1
    return jax.nn.log_softmax(jax.jit(model.apply)({"params": params}, tokens, mask_BxL=mask), axis=-1)


def run(model, params, prompts=PROMPTS, **kwargs):
    kwargs = {"max_new_tokens": NEW, "rng": 0, "prompt_bucket": BUCKET, **kwargs}
    return jax.device_get(sampling.generate(model, params, prompts, **kwargs))


def test_greedy_with_cache_equals_full_forward_argmax_at_every_step(model_and_params):
    model, params = model_and_params
    out = run(model, params, greedy=True)
    assert out.tokens_BxN.shape == (3, NEW) and out.lengths_B.tolist() == [NEW] * 3
    assert len({tuple(row) for row in out.tokens_BxN}) > 1, "degenerate test: every row decoded alike"
    sequences = [p + row.tolist() for p, row in zip(PROMPTS, out.tokens_BxN)]
    logprobs_BxLxV = full_forward_logprobs(model, params, sequences)
    for row, prompt in enumerate(PROMPTS):
        # Position i's logits predict token i + 1: those of the last prompt token predict step 0.
        steps = np.arange(len(prompt) - 1, len(prompt) - 1 + NEW)
        np.testing.assert_array_equal(np.argmax(logprobs_BxLxV[row, steps], axis=-1), out.tokens_BxN[row])
        # The returned log-probs are the full forward's, step by step (the cache's numerics; the
        # sharpened weights make logits of ~10-100, hence the float32 round-off of ~1e-5).
        expected = logprobs_BxLxV[row, steps, out.tokens_BxN[row]]
        np.testing.assert_allclose(out.logprobs_BxN[row], expected, rtol=1e-4, atol=1e-4)


def test_cached_prefill_logits_equal_full_forward(model_and_params):
    """Left-padded prefill: each row's real positions get the logits of the row alone, whatever
    the padding holds."""
    model, params = model_and_params
    width = BUCKET
    tokens = np.full((3, width), 3, np.int32)
    for row, prompt in enumerate(PROMPTS):
        tokens[row, width - len(prompt):] = prompt
    mask = tokens != 3

    @jax.jit
    def prefill(tokens):
        logits, _ = model.apply({"params": params, "cache": init_cache(model, 3, width + 4)}, tokens,
                                mask_BxL=mask, decode=True, mutable=["cache"])
        return logits

    logits = prefill(tokens)
    alone = full_forward_logprobs(model, params, PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        np.testing.assert_allclose(jax.nn.log_softmax(logits[row, width - len(prompt):]), alone[row, :len(prompt)],
                                   rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(logits[mask], prefill(np.where(mask, tokens, 200))[mask])


def test_cache_is_heads_first_in_the_compute_dtype():
    model = make_model("llama", dtype="bfloat16")
    cache = init_cache(model, 2, 16)
    assert cache["block_0"]["attn"]["cached_key"].shape == (2, 1, 16, 32)  # B, K, S, E
    assert {leaf.dtype for leaf in jax.tree.leaves(cache["block_1"])} == {jnp.dtype(jnp.bfloat16)}
    assert cache["key_mask"].shape == (2, 16) and cache["index"].dtype == jnp.int32


# A crafted distribution: probabilities 0.5, 0.25, 0.15, 0.06, 0.04 at shuffled vocabulary ids.
PROBS = np.array([0.5, 0.25, 0.15, 0.06, 0.04])
IDS = np.array([7, 2, 9, 0, 4])
LOGITS_V = np.full(10, -np.inf, np.float32)
LOGITS_V[IDS] = np.log(PROBS)
LOGITS_V[[1, 3, 5, 6, 8]] = np.log(1e-9)  # tiny but possible


@jax.jit
def draw_4000(top_k, top_p):
    logits = jnp.broadcast_to(LOGITS_V, (4000, 10))
    return sampling.sample_token(logits, jax.random.key(0), temperature=1.0, top_k=top_k, top_p=top_p, greedy=False)


@pytest.mark.parametrize("top_k,top_p,kept", [
    (1, 1.0, IDS[:1]), (3, 1.0, IDS[:3]),  # top-k
    (0, 0.7, IDS[:2]), (0, 0.8, IDS[:3]), (0, 0.1, IDS[:1]),  # nucleus: mass before a kept token < p
    (2, 0.9, IDS[:2]), (4, 0.8, IDS[:3]),  # both: the nucleus of the top-k distribution
])
def test_top_k_and_top_p_keep_exactly_their_set(top_k, top_p, kept):
    filtered = np.asarray(sampling.filter_logits(jnp.asarray(LOGITS_V)[None], top_k, top_p))[0]
    np.testing.assert_array_equal(np.flatnonzero(np.isfinite(filtered)), np.sort(kept))
    samples = np.asarray(draw_4000(top_k, top_p))
    assert set(samples.tolist()) == set(kept.tolist())  # never outside, and every member drawn
    # Kept tokens keep their relative probabilities.
    frequencies = np.array([np.mean(samples == i) for i in kept])
    np.testing.assert_allclose(frequencies, PROBS[:len(kept)] / PROBS[:len(kept)].sum(), atol=0.03)


def test_no_filter_changes_nothing():
    np.testing.assert_array_equal(sampling.filter_logits(jnp.asarray(LOGITS_V)[None], 0, 1.0)[0], LOGITS_V)


def test_greedy_and_near_zero_temperature_are_deterministic(model_and_params):
    model, params = model_and_params
    greedy = run(model, params, greedy=True, rng=1).tokens_BxN
    np.testing.assert_array_equal(greedy, run(model, params, greedy=True, rng=2).tokens_BxN)
    np.testing.assert_array_equal(greedy, run(model, params, temperature=1e-4, rng=3).tokens_BxN)


def test_same_seed_same_samples_other_seed_other_samples(model_and_params):
    model, params = model_and_params
    a, b, c = (run(model, params, rng=seed, temperature=2.0) for seed in (0, 0, 1))
    np.testing.assert_array_equal(a.tokens_BxN, b.tokens_BxN)
    assert not np.array_equal(a.tokens_BxN, c.tokens_BxN)


def test_eos_stops_a_row_and_pads_after_it(model_and_params):
    model, params = model_and_params
    free = run(model, params, temperature=2.0)
    row0 = free.tokens_BxN[0].tolist()
    stop = next(i for i in range(1, NEW) if row0[i] not in row0[:i])  # a first occurrence after step 0
    eos = row0[stop]
    out = run(model, params, temperature=2.0, eos_id=eos, pad_id=-7)
    assert out.tokens_BxN[0].tolist() == row0[:stop + 1] + [-7] * (NEW - stop - 1)
    assert out.lengths_B[0] == stop + 1
    np.testing.assert_array_equal(out.logprobs_BxN[0, stop + 1:], 0.0)
    np.testing.assert_allclose(out.logprobs_BxN[0, :stop + 1], free.logprobs_BxN[0, :stop + 1], atol=1e-6)
    for row in (1, 2):  # other rows run on until their own EOS
        n = out.lengths_B[row]
        assert out.tokens_BxN[row, :n].tolist() == free.tokens_BxN[row, :n].tolist()
        assert n == NEW or (out.tokens_BxN[row, n - 1] == eos and (out.tokens_BxN[row, n:] == -7).all())


def test_varied_prompts_and_settings_share_one_compile(model_and_params):
    model, params = model_and_params
    run(model, params, greedy=True)
    compiled = sampling.generate_padded._cache_size()
    run(model, params, [[3], [4, 5, 6, 7, 8], [9, 10]], greedy=True)
    run(model, params, greedy=True, eos_id=5, pad_id=1, rng=4)
    assert sampling.generate_padded._cache_size() == compiled


def test_sharded_generation_equals_single_device():
    model = make_model("llama", n_heads=4, n_kv_heads=2)  # grouped-query heads split over tensor
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = init_boxed(model)
    params = sharpen(nn.unbox(boxed))
    prompts = PROMPTS + [[20, 21, 22]]  # 4 rows: split over data x fsdp (the CLI test runs an uneven batch)
    expected = run(model, params, prompts, temperature=1.5)
    sharded_params = jax.device_put(params, sharding.logical_shardings(boxed, mesh))
    assert len(sharded_params["lm_head"]["kernel"].sharding.device_set) == 8
    with sharding.mesh_context(mesh):
        out = run(model, sharded_params, prompts, temperature=1.5)
    np.testing.assert_array_equal(out.tokens_BxN, expected.tokens_BxN)
    np.testing.assert_allclose(out.logprobs_BxN, expected.logprobs_BxN, rtol=1e-4, atol=1e-4)


def test_prompts_too_long_for_learned_positions_are_refused():
    model = make_model("gpt2")  # max_len 32
    with pytest.raises(ValueError, match="max_len"):
        sampling.generate(model, {}, [[3] * 30], max_new_tokens=3, rng=0)
    with pytest.raises(ValueError, match="prompt lengths"):
        sampling.generate(model, {}, [[3], []], max_new_tokens=3, rng=0)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    from conftest import make_tiny_config

    tmp = tmp_path_factory.mktemp("sample_cli")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i, name in enumerate(("model.py", "sampling.py", "train.py")):
        (corpus / f"{i}.txt").write_text(open(os.path.join(os.path.dirname(sampling.__file__), name)).read())
    config = make_tiny_config(**{
        "data.dataset": "files", "data.files": str(corpus / "*.txt"), "data.tfds_data_dir": str(tmp / "tfds"),
        "data.validation_fraction": 0.2, "train.num_steps": 2, "train.eval_every": 2,
        "train.checkpoint_every": 2, "train.eval_batches": 1, "optimizer.warmup_steps": 1,
        "train.peak_flops_per_device": 1e9})
    train.run(config, str(tmp / "run"))
    return str(tmp / "run")


def test_cli_prints_prompt_and_completion(trained_workdir, capsys):
    sample.main([f"--workdir={trained_workdir}", "--prompt=def fib(", "--prompt=", "--num_samples=2",
                 "--max_new_tokens=6", "--seed=3"])
    lines = capsys.readouterr().out.splitlines()
    headers = [line for line in lines if line.startswith("=== prompt")]
    assert headers == [f"=== prompt {i}/2, sample {j}/2 ===" for i in (1, 2) for j in (1, 2)]
    assert lines[1].startswith("def fib(") and lines[lines.index(headers[1]) + 1].startswith("def fib(")


def test_cli_without_checkpoint_fails_in_one_line(trained_workdir, tmp_path):
    workdir = tmp_path / "untrained"
    workdir.mkdir()
    (workdir / "config.json").write_text(open(os.path.join(trained_workdir, "config.json")).read())
    with pytest.raises(SystemExit) as exit_info:
        sample.main([f"--workdir={workdir}", "--prompt=x"])
    message = str(exit_info.value.code)
    assert message.startswith("error: --workdir: no checkpoint") and "\n" not in message
    with pytest.raises(SystemExit, match="config.json not found"):
        sample.main([f"--workdir={tmp_path / 'nothing'}", "--prompt=x"])


def test_benchmark_table_and_no_cache_baseline_agree():
    """benchmarks/sampling_throughput.py on a nano model: its recompute-everything baseline draws
    the same tokens as the KV cache, and the table prints."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "sampling_throughput.py"
    spec = importlib.util.spec_from_file_location("sampling_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure(bench.parse_args(["--size=nano", "--batch_size=2", "--prompt_len=8", "--new_tokens=6",
                                             "--repeats=1"]))
    assert result["tokens_agree"] == 1.0
    assert all(row["tokens_per_sec"] > 0 and row["compile_s"] > 0 for row in result["rows"])
    table = bench.format_table(result)
    assert "| KV cache" in table and "| no cache" in table and "KV cache / no cache" in table
