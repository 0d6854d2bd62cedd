"""benchmarks/compare_torch.py: its tables and ratios, llm_jax's row on the issue's shapes, and the
torch peers' rows where torch / transformers are installed (the `[bench]` extra)."""
import pytest

from conftest import load_benchmark, single_device_env


def _train_row(impl, tokens_per_sec, rss=1000.0):
    return {"kind": "train", "impl": impl, "config": "small", "params_total": 3_290_624, "tokens_per_sec": tokens_per_sec,
            "step_time_ms": 4096e3 / tokens_per_sec, "peak_rss_mib": rss, "compile_s": 3.0}


def test_train_table_ratios_and_targets():
    compare = load_benchmark("compare_torch")
    rows = [_train_row("llm_jax", 5000.0, rss=1500.0), _train_row("hf", 4000.0), _train_row("nanogpt", 10000.0, rss=750.0),
            {"impl": "nanogpt_compile", "error": "child process killed by signal 9 (out of memory?)"}]
    lines = compare.train_table("small", rows, flops_per_token=20e6, peak=200e9)
    table = "\n".join(lines)
    by_impl = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "---" not in line}
    assert by_impl["llm_jax"].rstrip(" |").endswith("1.00x")
    assert by_impl["hf"].rstrip(" |").endswith("1.25x")  # llm_jax / hf
    assert by_impl["nanogpt"].rstrip(" |").endswith("0.50x")
    assert "| 50.0 |" in by_impl["llm_jax"]  # MFU: 5000 tokens/s x 20 MFLOP / 200 GFLOP/s
    assert "FAILED: child process killed" in by_impl["nanogpt_compile"]
    # The summary compares with the fastest peer that ran, memory included.
    assert "fastest torch peer (nanogpt): 0.50x" in table and "peak RSS 2.00x" in table


def test_sample_table_ratio():
    compare = load_benchmark("compare_torch")
    rows = [{"impl": "llm_jax", "tokens_per_sec": 4000.0, "call_s": 0.256, "compile_s": 1.8, "peak_rss_mib": 450.0},
            {"impl": "hf", "tokens_per_sec": 1600.0, "call_s": 0.64, "first_call_s": 0.7, "peak_rss_mib": 420.0}]
    assert "llm_jax / HF generate: 2.50x" in "\n".join(compare.sample_table(rows))


def test_flops_per_token_matches_the_models_count():
    compare = load_benchmark("compare_torch")
    # small: 6 x (non-embedding weights + the tied head) + attention's 12 L T d per token.
    d, layers, vocab, seq = 256, 4, 256, 256
    weights = layers * 12 * d * d + vocab * d
    assert compare.flops_per_token("small") == pytest.approx(6 * weights + 12 * layers * seq * d, rel=1e-6)


def test_unknown_implementation_is_named():
    compare = load_benchmark("compare_torch")
    with pytest.raises(SystemExit):
        compare.parse_args(["--train_impls=llm_jax,jax_flash"])


@pytest.mark.slow
def test_llm_jax_row_on_the_small_shape():
    """One real child row: the training loop's step on the issue's exact shapes (vocab 256)."""
    compare = load_benchmark("compare_torch")
    row = compare.run_child(compare.__file__, ["--_row=train:llm_jax:small", "--steps=1", "--warmup=1"],
                            compare._MARKER, timeout=300, env=single_device_env())
    assert "error" not in row, row.get("error")
    assert row["params_total"] == 3_290_624  # = the torch GPT-2's at these shapes (vocab 256, tied)
    assert row["tokens_per_sec"] > 0 and row["compile_s"] > 0 and row["peak_rss_mib"] > 0


def test_torch_peer_rows_where_installed():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    peers = load_benchmark("torch_peers")
    shape = dict(d_model=32, n_layers=2, n_heads=2, vocab_size=64, seq_len=16, batch_size=2)
    for impl in ("hf", "nanogpt"):
        row = peers.train_row(impl, shape, steps=2, warmup=1, seed=0, threads=1)
        assert row["tokens_per_sec"] > 0 and row["loss"] > 0
    # Both peers have llm_jax's parameter count for the same shape (tied head, biases, learned positions).
    assert peers.train_row("hf", shape, steps=1, warmup=1, seed=0, threads=1)["params_total"] == \
        peers.train_row("nanogpt", shape, steps=1, warmup=1, seed=0, threads=1)["params_total"]
    sample = peers.sample_row(shape, batch_size=2, prompt_len=4, new_tokens=6, repeats=1, seed=0, threads=1)
    assert sample["tokens_per_sec"] > 0
