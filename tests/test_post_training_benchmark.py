"""benchmarks/post_training_throughput.py: the step table (SFT, cached DPO, online DPO) at nano size,
batch 2 pairs, seq 32, 2 timed steps, through the script's own child-process path.

The children run in fresh interpreters whose XLA_FLAGS lack conftest's 8 fake devices (2 pairs
cannot split over 8 devices) and ask XLA for its lowest backend optimisation level, which cuts
compilation (most of the test's time) by about a third: the times are only checked to be
positive, never compared.
"""
import io
import math

from conftest import load_benchmark, single_device_env


def test_post_training_step_rows_and_table():
    bench = load_benchmark("post_training_throughput")
    args = bench.parse_args(["--size=nano", "--batch_size=2", "--seq_len=32", "--steps=2", "--warmup=1",
                             "--row_timeout=120"])
    out = io.StringIO()
    rows = bench.run_step_rows(args, env=single_device_env("--xla_backend_optimization_level=0"), out=out)
    printed = out.getvalue().splitlines()
    assert printed[0].startswith("nano (gpt2, float32), 2 pairs x 2 x seq_len 32")
    assert "step ms (med)" in printed[1] and [line.split()[0] for line in printed[3:6]] == list(bench.KINDS)
    assert any(line.startswith("target cached DPO <= 1.3x SFT") for line in printed[6:])

    for row in rows:
        assert "error" not in row, row.get("error")
        assert row["num_devices"] == 1 and row["tokens_per_step"] == 2 * 2 * 32
        assert row["step_time_ms"] > 0 and row["tokens_per_sec"] > 0 and row["compile_s"] > 0
        assert len(row["step_times_ms"]) == 2 and all(t > 0 for t in row["step_times_ms"])
        assert math.isfinite(row["loss"])
    by_kind = {row["kind"]: row for row in rows}
    assert by_kind["dpo_cached"]["reference_forward_ms"] > 0
    # The reference is the initial policy: the first DPO step's loss is log 2, cached or online.
    for kind in ("dpo_cached", "dpo_online"):
        assert abs(by_kind[kind]["first_loss"] - math.log(2)) < 1e-5, by_kind[kind]["first_loss"]

    table = bench.format_step_table(rows + [{"kind": "dpo_online", "error": "RESOURCE_EXHAUSTED: oom"}])
    header, rule, sft, cached, online, failed = table.splitlines()
    assert "step ms (med)" in header and "x SFT" in header and "tokens/s" in header
    assert sft.split()[0] == "sft" and sft.split()[-4] == "1.00"
    for line, kind in ((cached, "dpo_cached"), (online, "dpo_online")):
        assert line.split()[0] == kind
        assert f"{by_kind[kind]['step_time_ms']:,.1f}" in line
        assert f"{by_kind[kind]['step_time_ms'] / by_kind['sft']['step_time_ms']:.2f}" in line
    assert failed.split()[:2] == ["dpo_online", "FAILED:"] and "RESOURCE_EXHAUSTED" in failed
    notes = "\n".join(bench.step_notes(rows))
    assert "target cached DPO <= 1.3x SFT" in notes and "caching the reference took" in notes


def test_online_table_format():
    """benchmarks/online_dpo_timing.py's table from a metrics-like result (no run: the online loop
    has its own tests)."""
    bench = load_benchmark("online_dpo_timing")
    result = {"iterations": [{"iteration": 1, "sample_s": 3.0, "train_s": 1.0, "pairs": 10},
                             {"iteration": 2, "sample_s": 1.0, "train_s": 1.0, "pairs": 12},
                             {"iteration": 3, "sample_s": 2.0, "train_s": 2.0, "pairs": 14}]}
    lines = bench.format_online_table(result).splitlines()
    assert "sampling s" in lines[0] and "sampling %" in lines[0]
    assert lines[2].split() == ["1", "*", "3.00", "1.00", "75.0", "10"]
    assert lines[5].split() == ["2..", "mean", "1.50", "1.50", "50.0", "13"]
    assert bench.format_online_table({"error": "boom"}) == "online DPO FAILED: boom"
    out = io.StringIO()
    print(bench.format_online_table(result), file=out)
    assert "compilation" in out.getvalue()
