"""benchmarks/train_throughput.py: one real row (nano, batch 2, seq 32, 2 steps) and its table line.

The row runs through the script's own child-process path, in a fresh interpreter whose XLA_FLAGS
lack conftest's 8 fake devices: a batch of 2 cannot split over 8 devices, and one device gets the
host's whole measured peak, so the MFU is a real one.
"""

from conftest import load_benchmark, single_device_env


def test_train_throughput_row_and_table():
    bench = load_benchmark("train_throughput")
    args = bench.parse_args(["--sizes=nano", "--dtypes=float32", "--batch_size=2", "--seq_len=32",
                             "--steps=2", "--warmup=1", "--row_timeout=120"])
    row = bench.run_row_subprocess(args, "nano", "float32", env=single_device_env())

    assert "error" not in row, row.get("error")
    assert (row["size"], row["dtype"], row["num_devices"]) == ("nano", "float32", 1)
    assert row["tokens_per_sec"] > 0
    assert 0 < row["mfu"] < 1.5, row["mfu"]
    assert row["params_total"] > row["params_non_embedding"] > 0
    assert row["peak_memory_mib"] > 0 and row["compile_s"] > 0
    # The loop's formula: tokens/s x FLOPs/token over the peak of all devices.
    expected = row["tokens_per_sec"] * row["flops_per_token"] / (row["peak_flops_per_device"] * row["num_devices"])
    assert abs(row["mfu"] - expected) <= 1e-9 * expected

    table = bench.format_table([row, {"size": "mini", "dtype": "bfloat16", "error": "RESOURCE_EXHAUSTED: oom"}])
    header, rule, line, failed = table.splitlines()
    assert "tokens/s" in header and "MFU %" in header and "compile s" in header
    assert line.split()[:2] == ["nano", "float32"]
    assert f"{row['params_total']:,}" in line and f"{100 * row['mfu']:.2f}" in line
    assert failed.split()[:3] == ["mini", "bfloat16", "FAILED:"] and "RESOURCE_EXHAUSTED" in failed
