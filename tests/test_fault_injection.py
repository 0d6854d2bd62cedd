"""The fault-injection suite in its short form (the long form: python benchmarks/fault_injection.py):
child runs killed at random, killed mid-save and with a damaged newest checkpoint all finish with the
uninterrupted run's parameters and metrics, losing no checkpointed step. (SIGTERM paths: the long
form, and tests/test_preemption.py in process.)"""
import pytest

from conftest import load_benchmark

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def test_short_fault_injection_suite_recovers_everything(tmp_path, capsys):
    faults = load_benchmark("fault_injection")
    args = faults.parse_args(["--random_kills=1", "--num_steps=12", "--checkpoint_every=4", "--damages=flip",
                              "--scenarios=random_sigkill,sigkill_mid_save,damaged_checkpoint",
                              f"--workroot={tmp_path}", "--seed=1"])
    rows = {row["scenario"]: row for row in faults.run(args)}
    print(faults.format_table(list(rows.values())))
    assert set(rows) == {"random SIGKILL", "SIGKILL mid-save", "damaged checkpoint"}
    for name, row in rows.items():
        assert row["faults injected"] >= 1, name
        assert row["runs recovered"] == row["faults injected"], row
        assert row["mismatches"] == 0 and row["checkpointed steps lost"] == 0, row
    assert (tmp_path / "damaged_0" / "checkpoints" / "9.corrupt").is_dir()  # set aside, kept


def test_table_totals_each_column():
    faults = load_benchmark("fault_injection")
    rows = [{"scenario": "a", "faults injected": 2, "runs recovered": 2, "checkpointed steps lost": 0,
             "steps redone": 5, "mismatches": 0},
            {"scenario": "b", "faults injected": 1, "runs recovered": 1, "checkpointed steps lost": 0,
             "steps redone": 1, "mismatches": 1}]
    total = faults.format_table(rows).splitlines()[-1]
    assert [cell.strip() for cell in total.split("|")] == ["total", "3", "3", "0", "6", "1"]
