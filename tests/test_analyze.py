"""Tests for llm_jax.analyze: each analysis of a sweep CSV with a known answer, its files, and the
runs it leaves out."""
import csv
import json

import numpy as np
import pytest

from llm_jax import analyze, scaling

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def write_csv(path, rows):
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def run(name, **fields):
    return {"run": name, "status": "finished", **{k: repr(float(v)) for k, v in fields.items()}}


def test_params_fits_l_of_n_and_writes_its_record(tmp_path, capsys):
    rng = np.random.default_rng(0)
    n = np.geomspace(2e4, 2e6, 8)
    loss = (1.0 + 30.0 * n**-0.3) * np.exp(rng.normal(0, 0.002, n.size))
    rows = [run(f"r{i}", params_non_embedding=x, tokens_seen=4e6, eval_loss=y) for i, (x, y) in enumerate(zip(n, loss))]
    rows.append({"run": "crashed", "status": "failed", "params_non_embedding": "1e5", "eval_loss": ""})
    csv_path = write_csv(tmp_path / "sweep.csv", rows)
    out = tmp_path / "study"
    assert analyze.main(["params", csv_path, f"--out={out}", "--bootstrap=30"]) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert fit["runs"] == 8 and fit["left_out"] == ["crashed"]
    assert abs(fit["alpha"] - 0.3) < 3 * fit["stderr"]["alpha"] + 0.01
    assert fit["ci95"]["alpha"][0] < fit["alpha"] < fit["ci95"]["alpha"][1]
    assert 0 < fit["pure_power_law"]["alpha"] < 0.3  # the irreducible loss flattens a pure power law
    assert (out / "loss_vs_params.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "results.csv").read_text() == (tmp_path / "sweep.csv").read_text()
    printed = capsys.readouterr().out
    assert "| r0 |" in printed and "alpha = " in printed and "Left out (not finished): crashed" in printed


def test_isoflop_recovers_the_exponents_of_a_known_law(tmp_path, capsys):
    truth = scaling.Chinchilla(**TRUE, stderr={}, ci={})
    rows = []
    for C in (1e18, 1e19, 1e20):
        n_opt, _ = truth.optimal_allocation(C)
        for i, n in enumerate(n_opt * np.geomspace(1 / 4, 4, 5)):
            d = C / (6 * n)
            rows.append(run(f"C={C:.0e},{i}", params_non_embedding=n, tokens_seen=d, flops=C, eval_loss=truth(n, d)))
    out = tmp_path / "iso"
    assert analyze.main(["isoflop", write_csv(tmp_path / "s.csv", rows), f"--out={out}", "--bootstrap=5"]) == 0
    fit = json.loads((out / "fit.json").read_text())
    a = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert fit["a"] == pytest.approx(a, abs=0.02) and fit["b"] == pytest.approx(1 - a, abs=0.02)
    assert fit["chinchilla_fit"]["alpha"] == pytest.approx(TRUE["alpha"], abs=0.05)
    assert all(b["interior"] for b in fit["budgets"])
    assert (out / "isoflop.png").read_bytes()[:8] == PNG_MAGIC
    assert "Approach 2" in capsys.readouterr().out


def test_lr_finds_each_widths_best_rate_and_its_trend(tmp_path, capsys):
    rows, lrs = [], np.geomspace(1e-4, 1e-1, 7)
    for width in (64, 128, 256):
        best = 0.01 * (64 / width)  # best lr ~ width^-1
        for lr in lrs:
            loss = 3.0 + 0.1 * (np.log(lr) - np.log(best)) ** 2
            rows.append(run(f"d{width},{lr:.2g}", **{"model.d_model": width, "optimizer.learning_rate": lr,
                                                     "eval_loss": loss}))
    out = tmp_path / "lr"
    assert analyze.main(["lr", write_csv(tmp_path / "s.csv", rows), f"--out={out}"]) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert fit["best"]["128"]["lr"] == pytest.approx(0.005, rel=0.3)  # a 3-point parabola between grid points
    assert fit["best_lr_vs_width_exponent"] == pytest.approx(-1.0, abs=0.25)
    assert (out / "loss_vs_lr.png").read_bytes()[:8] == PNG_MAGIC
    assert "**best lr**" in capsys.readouterr().out


def test_a_csv_without_finished_runs_or_columns_is_one_error_line(tmp_path, capsys):
    empty = write_csv(tmp_path / "e.csv", [{"run": "a", "status": "failed", "eval_loss": ""}])
    assert analyze.main(["params", empty, f"--out={tmp_path / 'o'}"]) == 1
    assert capsys.readouterr().err.strip() == f"error: {empty}: no finished run with an eval_loss"
    no_width = write_csv(tmp_path / "w.csv", [run("a", eval_loss=3.0)])
    assert analyze.main(["lr", no_width, f"--out={tmp_path / 'o'}"]) == 1
    assert "no column 'model.d_model'" in capsys.readouterr().err


def test_isoflop_profiles_without_a_minimum_still_get_approach_3_and_a_plot(tmp_path, capsys):
    rows = []
    for C, base in ((1e15, 3.0), (1e16, 2.8)):
        # Loss rises with N and flattens (concave in ln N): the smallest size is best, no parabola minimum.
        for i, (n, rise) in enumerate(zip((1e4, 3e4, 1e5, 3e5), (0.0, 0.10, 0.15, 0.17))):
            rows.append(run(f"C={C:.0e},{i}", params_non_embedding=n, tokens_seen=C / (6 * n), flops=C,
                            eval_loss=base + rise))
    out = tmp_path / "iso"
    assert analyze.main(["isoflop", write_csv(tmp_path / "s.csv", rows), f"--out={out}", "--bootstrap=3"]) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert "no minimum" in fit["approach2_error"] and "a" not in fit
    assert [b["best_n"] for b in fit["budgets"]] == [1e4, 1e4]
    assert (out / "isoflop.png").read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "Approach 2 cannot place N_opt" in printed and "Approach 3" in printed
