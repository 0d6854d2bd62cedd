"""Fits a sweep's CSV (llm_jax/sweep.py `collect`) and writes its plots: the analysis step of a study.

    python -m llm_jax.analyze params  runs/sweeps/<name>/results.csv --out=experiments/<study>
    python -m llm_jax.analyze isoflop runs/sweeps/<name>/results.csv --out=experiments/<study>
    python -m llm_jax.analyze lr      runs/sweeps/<name>/results.csv --out=experiments/<study>
    python -m llm_jax.analyze icl     runs/sweeps/<name>/results.csv --out=experiments/<study> \
        --tasks='<held-out mappings>/*.jsonl'

`params`: L(N) = E + A N^-alpha over the runs' non-embedding N and final eval loss (with bootstrap
intervals), and the pure power law L = A N^-alpha that Kaplan et al. fit. `isoflop`: Chinchilla's
approach 2 (a parabola per budget, N_opt ~ C^a, D_opt ~ C^b) and approach 3 (L(N, D), Huber) on
the same points. `lr`: the best learning rate per width (a parabola in ln lr through the lowest
loss) and how it moves with width, best_lr ~ d_model^k. `icl`: each run's few-shot exact match on
held-out in-context mappings (llm_jax/data/icl.py) at 0/1/4/8/16 shots, pooled over the task
files, against an ideal in-context learner on the same prompts (right whenever the query's input
was demonstrated, chance otherwise).

Each writes into `--out`: the CSV (copied, the study's record), `fit.json` (every fitted number)
and PNG plots, and prints a markdown summary for the study's README. Runs that did not finish are
left out, and named.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

from llm_jax import scaling

# Published values the READMEs compare with.
KAPLAN_ALPHA_N = 0.076  # Kaplan et al. (2020) eq. 1.1, L = (N_c / N)^alpha_N, converged models
# Runs of one IsoFLOP budget agree to about 1% (whole steps); budgets are 3x apart.
BUDGET_RTOL = 0.05
CHINCHILLA = dict(alpha=0.34, beta=0.28, a=0.49, b=0.51)  # Hoffmann et al. (2022): approach 3 (table A3); approach 2


def finished_rows(path: str) -> tuple[list[dict], list[str]]:
    """The CSV's rows of finished runs with a finite eval loss, and the names of the others."""
    rows, left_out = [], []
    for row in scaling.read_rows(path):
        try:
            ok = row.get("status") == "finished" and np.isfinite(float(row["eval_loss"]))
        except (KeyError, ValueError):
            ok = False
        (rows if ok else left_out).append(row if ok else row.get("run", "?"))
    if not rows:
        raise ValueError(f"{path}: no finished run with an eval_loss")
    return rows, left_out


def _pure_power_law(x, loss) -> dict:
    """L = A x^-alpha (Kaplan's form, no irreducible term) by least squares in log-log."""
    slope, se, coef = scaling.loglog_fit(x, loss)
    return {"alpha": -slope, "alpha_stderr": se, "A": coef}


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def analyze_params(rows, out: str, n_bootstrap: int = 200) -> tuple[dict, str]:
    n, d, loss = scaling.columns(rows, "params_non_embedding", "tokens_seen", "eval_loss")
    fit = scaling.fit_power_law(n, loss, n_bootstrap=n_bootstrap)
    pure = _pure_power_law(n, loss)
    scaling.plot_loss_vs_params(n, loss, os.path.join(out, "loss_vs_params.png"), fit)
    result = {"E": fit.E, "A": fit.A, "alpha": fit.alpha, "stderr": fit.stderr, "ci95": fit.ci,
              "pure_power_law": pure, "N_range": [float(n.min()), float(n.max())],
              "tokens": sorted(set(map(float, d))), "published": {"kaplan_alpha_N": KAPLAN_ALPHA_N,
                                                                  "chinchilla_alpha": CHINCHILLA["alpha"]}}
    order = np.argsort(n)
    text = _table(["run", "non-embedding N", "tokens", "eval loss", "fit"],
                  [[rows[i]["run"], f"{int(n[i]):,}", f"{int(d[i]):,}", f"{loss[i]:.4f}", f"{fit(n[i]):.4f}"]
                   for i in order])
    ci = fit.ci.get("alpha", (float("nan"),) * 2)
    text += (f"\n\nL(N) = {fit.E:.3f} + {fit.A:.3g} N^-{fit.alpha:.3f}: alpha = {fit.alpha:.3f} ± "
             f"{fit.stderr['alpha']:.3f} (95% bootstrap interval {ci[0]:.3f}-{ci[1]:.3f}), E = {fit.E:.3f} ± "
             f"{fit.stderr['E']:.3f}; N spans {n.max() / n.min():.0f}x."
             f"\nPure power law L = A N^-alpha (Kaplan's form): alpha = {pure['alpha']:.4f} ± {pure['alpha_stderr']:.4f}"
             f" (Kaplan: {KAPLAN_ALPHA_N}; Chinchilla's N term: {CHINCHILLA['alpha']}).")
    return result, text


def analyze_isoflop(rows, out: str, n_bootstrap: int = 100) -> tuple[dict, str]:
    n, d, c, loss = scaling.columns(rows, "params_non_embedding", "tokens_seen", "flops", "eval_loss")
    chin = scaling.fit_chinchilla(n, d, loss, n_bootstrap=n_bootstrap)
    try:
        iso = scaling.fit_isoflop(n, loss, c, tokens=d, rtol=BUDGET_RTOL)
    except ValueError as e:  # a profile without a minimum inside its sizes: approach 3 still fits
        return _isoflop_without_optimum(n, c, loss, out, chin, str(e))
    scaling.plot_isoflop(iso, os.path.join(out, "isoflop.png"))
    chin_fit, chin_text = _chinchilla_text(chin)
    result = {"a": iso.a, "a_stderr": iso.a_stderr, "b": iso.b, "b_stderr": iso.b_stderr,
              "budgets": [{"flops": b.flops, "n_opt": b.n_opt, "d_opt": b.d_opt, "loss_opt": b.loss_opt,
                           "interior": b.interior, "sizes": sorted(map(float, b.n))} for b in iso.budgets],
              "chinchilla_fit": chin_fit, "published": CHINCHILLA}
    text = _table(["budget C (FLOPs)", "sizes N", "N_opt", "D_opt (tokens)", "loss at N_opt", "inside the sizes"],
                  [[f"{b.flops:.2g}", ", ".join(f"{x / 1e3:.0f}k" for x in sorted(b.n)), f"{b.n_opt:,.0f}",
                    f"{b.d_opt:,.0f}", f"{b.loss_opt:.4f}", "yes" if b.interior else "no"] for b in iso.budgets])
    text += (f"\n\nApproach 2 (IsoFLOP parabolas): N_opt ∝ C^{iso.a:.3f} ± {iso.a_stderr:.3f}, "
             f"D_opt ∝ C^{iso.b:.3f} ± {iso.b_stderr:.3f} (Chinchilla: a = {CHINCHILLA['a']}, b = {CHINCHILLA['b']})."
             f"\n{chin_text}")
    return result, text


def _chinchilla_text(chin) -> tuple[dict, str]:
    a3 = chin.beta / (chin.alpha + chin.beta)  # approach 3's N_opt ~ C^a
    fit = {"E": chin.E, "A": chin.A, "B": chin.B, "alpha": chin.alpha, "beta": chin.beta, "stderr": chin.stderr, "a": a3}
    return fit, (f"Approach 3 (L(N, D) = E + A/N^alpha + B/D^beta, Huber): alpha = {chin.alpha:.3f} ± "
                 f"{chin.stderr['alpha']:.3f}, beta = {chin.beta:.3f} ± {chin.stderr['beta']:.3f}, E = {chin.E:.3f}; "
                 f"a = beta/(alpha+beta) = {a3:.3f} (Chinchilla: alpha = {CHINCHILLA['alpha']}, "
                 f"beta = {CHINCHILLA['beta']}).")


def _isoflop_without_optimum(n, c, loss, out: str, chin, problem: str) -> tuple[dict, str]:
    """The profiles as measured (loss vs N per budget) when approach 2 cannot place an optimum."""
    budgets = scaling.group_budgets(c, BUDGET_RTOL)
    curves = {f"{np.exp(np.log(c[idx]).mean()):.2g} FLOPs": (n[idx], loss[idx]) for idx in budgets}
    scaling.plot_lr_sweep(curves, os.path.join(out, "isoflop.png"), legend_title="budget",
                          xlabel="non-embedding parameters N")
    chin_fit, chin_text = _chinchilla_text(chin)
    best = [{"flops": float(np.exp(np.log(c[idx]).mean())), "best_n": float(n[idx][np.argmin(loss[idx])]),
             "sizes": sorted(map(float, n[idx]))} for idx in budgets]
    text = _table(["budget C (FLOPs)", "sizes N", "lowest-loss N", "at the window's edge"],
                  [[f"{b['flops']:.2g}", ", ".join(f"{x / 1e3:.1f}k" for x in b["sizes"]), f"{b['best_n']:,.0f}",
                    "yes" if b["best_n"] in (b["sizes"][0], b["sizes"][-1]) else "no"] for b in best])
    text += f"\n\nApproach 2 cannot place N_opt: {problem}.\n{chin_text}"
    return {"approach2_error": problem, "budgets": best, "chinchilla_fit": chin_fit, "published": CHINCHILLA}, text


def analyze_lr(rows, out: str, n_bootstrap: int = 0, group: str = "model.d_model") -> tuple[dict, str]:
    if group not in rows[0]:
        raise ValueError(f"the CSV has no column {group!r} to group runs by")
    curves, best = {}, {}
    for key in sorted({row[group] for row in rows}, key=float):
        lr, loss = scaling.columns([r for r in rows if r[group] == key], "optimizer.learning_rate", "eval_loss")
        curves[int(float(key))] = (lr, loss)
        best[int(float(key))] = scaling.best_learning_rate(lr, loss)
    scaling.plot_lr_sweep(curves, os.path.join(out, "loss_vs_lr.png"), best, legend_title=group.split(".")[-1])
    widths = np.array(sorted(best), dtype=np.float64)
    slope = _pure_power_law(widths, np.array([best[int(w)].lr for w in widths]))
    lrs = sorted({float(lr) for lr, _ in curves.values() for lr in lr})
    table = [[f"{lr:.3g}"] + [next((f"{l:.4f}" for x, l in zip(*curves[w]) if x == lr), "") for w in curves]
             for lr in lrs]
    table.append(["**best lr**"] + [f"**{best[w].lr:.3g}**" + ("" if best[w].interior else " (edge)") for w in curves])
    result = {"group": group, "best": {str(w): vars(b) for w, b in best.items()},
              "best_lr_vs_width_exponent": -slope["alpha"], "exponent_stderr": slope["alpha_stderr"]}
    text = _table(["peak lr \\ " + group.split(".")[-1]] + [str(w) for w in curves], table)
    text += (f"\n\nBest learning rate ∝ {group.split('.')[-1]}^{-slope['alpha']:.2f}"
             + (f" ± {slope['alpha_stderr']:.2f}" if np.isfinite(slope["alpha_stderr"]) else "")
             + f" over widths {', '.join(map(str, curves))}.")
    return result, text


def ideal_icl_accuracy(task_paths: list[str], shots: int, *, seed: int) -> float:
    """Exact match of a perfect in-context learner on the prompts `fewshot` builds: 1 when a
    demonstration shares the query's input, one over the number of labels otherwise."""
    from llm_jax import fewshot  # noqa: PLC0415 (JAX-free, but only this analysis needs it)
    scores, labels = [], set()
    for path in task_paths:
        examples = fewshot.read_task(path, "generation")[1]
        labels |= {e.target for e in examples}
        for i, query in enumerate(examples):
            demos = fewshot.demonstration_indices(examples, query, shots, seed=seed, index=i, query_index=i,
                                                  skip_query_context=False)
            scores.append(any(examples[j].context == query.context for j in demos))
    return float(np.mean(scores) + (1 - np.mean(scores)) / max(len(labels), 1))


def _plot_eval_loss_curves(rows, path: str) -> dict:
    """Each run's eval loss against tokens seen (its metrics.jsonl): the induction-head phase change
    is the abrupt drop, and its step, not only the final loss, is what differs between sizes."""
    from llm_jax import metrics  # noqa: PLC0415 (imports JAX)
    curves = {}
    for row in rows:
        evals = [m for m in metrics.read_metrics(os.path.join(row["workdir"], metrics.METRICS_FILE))
                 if "eval/loss" in m]
        tokens_per_step = float(row["tokens_seen"]) / max(float(row["final_step"]), 1.0)
        curves[row["run"]] = (np.array([m["step"] * tokens_per_step for m in evals]),
                              np.array([m["eval/loss"] for m in evals]))
    scaling.plot_curves(curves, path, xlabel="tokens seen", ylabel="eval loss (nats/token)")
    return {run: np.stack(xy, axis=1).tolist() for run, xy in curves.items()}


def analyze_icl(rows, out: str, tasks: str = "", shots: str = "0,1,4,8,16", seed: int = 1234) -> tuple[dict, str]:
    """Few-shot accuracy on held-out mappings of every run, by shots and by size."""
    from llm_jax import fewshot, train  # noqa: PLC0415 (JAX: only this analysis loads models)
    from llm_jax.data import icl  # noqa: PLC0415
    if not tasks:
        raise ValueError("icl needs --tasks, the held-out mappings' JSONL files (python -m llm_jax.data.icl tasks)")
    paths = fewshot.task_paths(tasks)
    counts = [int(k) for k in shots.split(",")]
    specs = [{"path": p, "example_separator": icl.EXAMPLE_SEPARATOR, "target_delimiter": icl.TARGET_DELIMITER,
              "skip_query_context": False, "max_new_tokens": icl.NEW_TOKENS} for p in paths]
    ideal = {k: ideal_icl_accuracy(paths, k, seed=seed) for k in counts}
    order = sorted(rows, key=lambda r: float(r["params_non_embedding"]))
    table, records, sizes = [], [], {}  # sizes: (N, layers) -> each seed's accuracy by shots
    for row in order:
        exp, params = train.load_run(row["workdir"])
        pooled = fewshot.pooled(fewshot.evaluate_tasks(exp.model, params, exp.tokenizer, specs, counts, seed=seed))
        by_shots = {r["shots"]: r for r in pooled if r["metric"] == "exact_match"}
        n = int(float(row["params_non_embedding"]))
        sizes.setdefault((n, row.get("model.n_layers", "?")), []).append([by_shots[k]["value"] for k in counts])
        table.append([row["run"], f"{n:,}", f"{float(row['eval_loss']):.4f}"]
                     + [f"{by_shots[k]['value']:.3f} ± {by_shots[k]['stderr']:.3f}" for k in counts])
        records += [{"run": row["run"], "params_non_embedding": n, "shots": k, "accuracy": by_shots[k]["value"],
                     "stderr": by_shots[k]["stderr"], "n": by_shots[k]["n"]} for k in counts]
    # Repeated sizes (seeds) are averaged in the plots: whether a small model leaves the plateau is
    # a matter of its seed, so one seed's curve says little about its size.
    mean = {key: np.mean(accs, axis=0) for key, accs in sizes.items()}
    repeated = any(len(accs) > 1 for accs in sizes.values())
    chance = ideal[0] if 0 in ideal else ideal_icl_accuracy(paths, 0, seed=seed)
    accuracy = {f"{n / 1e3:.0f}k, {layers} layers" + (f" ({len(sizes[n, layers])} seeds)" if repeated else ""):
                (np.array(counts), acc) for (n, layers), acc in mean.items()}
    scaling.plot_curves(accuracy, os.path.join(out, "accuracy_vs_shots.png"), xlabel="demonstrations (shots)",
                        ylabel="exact match, held-out mappings" + (", mean over seeds" if repeated else ""),
                        legend_title="non-embedding N", reference=("ideal in-context learner", counts,
                                                                   [ideal[k] for k in counts]),
                        hline=("chance", chance))
    n_axis = np.array([n for n, _ in mean], dtype=np.float64)
    by_size = {f"{k}-shot": (n_axis, np.array([acc[i] for acc in mean.values()])) for i, k in enumerate(counts)}
    scaling.plot_curves(by_size, os.path.join(out, "accuracy_vs_size.png"), xlabel="non-embedding parameters N",
                        ylabel="exact match, held-out mappings" + (", mean over seeds" if repeated else ""),
                        xscale="log", hline=("chance", chance))
    loss_curves = _plot_eval_loss_curves(order, os.path.join(out, "eval_loss_vs_tokens.png"))
    if repeated:
        table += [[f"mean of {len(sizes[n, layers])}: {n / 1e3:.0f}k, {layers} layers", f"{n:,}", ""]
                  + [f"{a:.3f}" for a in acc] for (n, layers), acc in mean.items()]
    table.append(["ideal in-context learner", "", ""] + [f"{ideal[k]:.3f}" for k in counts])
    text = _table(["run", "non-embedding N", "eval loss"] + [f"{k}-shot" for k in counts], table)
    text += (f"\n\nExact match on {len(paths)} held-out mappings ({records[0]['n'] if records else 0} queries per "
             f"shot count), ± one standard error; chance {chance:.3f}.")
    means = [{"params_non_embedding": n, "n_layers": layers, "seeds": len(sizes[n, layers]),
              "accuracy": dict(zip(counts, map(float, acc)))} for (n, layers), acc in mean.items()]
    return {"tasks": paths, "shots": counts, "seed": seed, "ideal": ideal, "runs": records, "sizes": means,
            "eval_loss_vs_tokens": loss_curves}, text


ANALYSES = {"params": analyze_params, "isoflop": analyze_isoflop, "lr": analyze_lr, "icl": analyze_icl}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_jax.analyze", description=__doc__.split("\n")[0])
    parser.add_argument("analysis", choices=sorted(ANALYSES))
    parser.add_argument("csv", help="a sweep's results.csv")
    parser.add_argument("--out", required=True, help="folder for the CSV copy, fit.json and plots")
    parser.add_argument("--bootstrap", type=int, default=None,
                        help="refits on resampled runs for the intervals (params: 200, isoflop: 100)")
    parser.add_argument("--tasks", default="", help="icl: the held-out mappings' task files (comma-separated globs)")
    parser.add_argument("--shots", default="0,1,4,8,16", help="icl: comma-separated numbers of demonstrations")
    args = parser.parse_args(argv)
    try:
        rows, left_out = finished_rows(args.csv)
        os.makedirs(args.out, exist_ok=True)
        extra = {} if args.bootstrap is None else {"n_bootstrap": args.bootstrap}
        if args.analysis == "icl":
            extra = {"tasks": args.tasks, "shots": args.shots}
        result, text = ANALYSES[args.analysis](rows, args.out, **extra)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    copy = os.path.join(args.out, "results.csv")
    if not os.path.exists(copy) or not os.path.samefile(args.csv, copy):
        shutil.copyfile(args.csv, copy)
    with open(os.path.join(args.out, "fit.json"), "w") as f:
        json.dump({"csv": args.csv, "runs": len(rows), "left_out": left_out, **result}, f, indent=1, default=float)
    if left_out:
        text += f"\n\nLeft out (not finished): {', '.join(left_out)}"
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
