"""Scaling-law tools: parameter and FLOP counts, power-law and IsoFLOP fits, plots.

What a reproduction of Kaplan et al. (2020) and Hoffmann et al. (2022, "Chinchilla") needs:

- `count_params` / `non_embedding_params`: N of a `model.TransformerConfig` from shapes alone.
- `training_flops`: C of a run, `metrics.flops_per_token` (6N + attention) times its tokens.
- `fit_power_law`: L(x) = E + A x^-alpha, for x = N (Kaplan's L(N)) or x = D (L(D); read A as B
  and alpha as beta), least squares on log-loss, standard errors from the Jacobian.
- `fit_chinchilla`: L(N, D) = E + A/N^alpha + B/D^beta, Chinchilla's approach 3 (Huber loss on
  log-space residuals, L-BFGS from a grid of starts), uncertainty by bootstrap over points.
- `fit_isoflop`: Chinchilla's approach 2: a parabola of loss vs log N per compute budget, its
  minimum N_opt(C), then N_opt ~ C^a and D_opt ~ C^b in log-log.
- `plot_loss_vs_params`, `plot_loss_vs_tokens`, `plot_isoflop`: PNG files.

Data are plain arrays. A sweep's CSV (one row per run, as llm_jax/sweep.py writes) is read with
`read_rows(path)` and turned into arrays with `columns(rows, ...)`; its columns are:

    params_non_embedding   N, Kaplan's non-embedding parameter count
    tokens_seen            D, training tokens the run saw
    flops                  C, the run's training compute (FLOPs, `training_flops`); fit_isoflop
                           groups runs of one budget by it (within 1%)
    eval_loss              L, the held-out loss (nats per token) at the end of the run
"""
from __future__ import annotations

import csv
import dataclasses
import os
from typing import Sequence

import numpy as np
from flax import linen as nn
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter
from scipy import optimize

from llm_jax import metrics, model as model_lib

CSV_COLUMNS = ("params_non_embedding", "tokens_seen", "flops", "eval_loss")
HUBER_DELTA = 1e-3  # Chinchilla's
# Chinchilla's grid of starts: a, b (log A, log B), e (log E), alpha, beta.
_CHINCHILLA_GRID = (np.arange(0, 30, 5.0), np.arange(0, 30, 5.0), np.arange(-1, 1.5, 0.5),
                    np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5))


# ---- Counting: N and C ------------------------------------------------------------------------

def count_params(model_cfg: model_lib.TransformerConfig) -> dict[str, int]:
    """`model.parameter_counts` ("total", "embedding", "non_embedding") from shapes only."""
    # Shapes by jax.eval_shape (inside init_params_shape): nothing is allocated, so gpt2-medium
    # costs what nano does. Unboxed so the leaves' paths end in their names ("embedding").
    shapes = nn.unbox(model_lib.init_params_shape(model_cfg, seq_len=1))
    return model_lib.parameter_counts(shapes["params"])


def non_embedding_params(model_cfg: model_lib.TransformerConfig) -> int:
    """Kaplan et al.'s N: every parameter except embedding tables and an untied output head."""
    return count_params(model_cfg)["non_embedding"]


def training_flops(model_cfg, tokens: float, seq_len: int | None = None) -> float:
    """Training compute of `tokens` tokens in `seq_len`-long rows (default the model's max_len).

    6 FLOPs per weight and token plus attention's T-dependent term, the output head included
    (see `metrics.flops_per_token`): more than Kaplan's 6 N D for small models, as Chinchilla's
    appendix F counts it.
    """
    return metrics.flops_per_token(model_cfg, seq_len or model_cfg.max_len) * float(tokens)


# ---- Data in ----------------------------------------------------------------------------------

def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a sweep CSV as dicts (column name -> text)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def columns(rows: Sequence[dict], *names: str) -> tuple[np.ndarray, ...]:
    """Float arrays of the named columns of `rows` (dicts, e.g. from `read_rows`)."""
    def number(i, row, name):
        if name not in row:
            raise ValueError(f"row {i} has no column {name!r} (columns: {sorted(row)})")
        try:
            return float(row[name])
        except (TypeError, ValueError):
            raise ValueError(f"row {i}: column {name!r} is not a number: {row[name]!r}") from None
    return tuple(np.array([number(i, row, name) for i, row in enumerate(rows)], np.float64) for name in names)


def _arrays(min_points: int, **named) -> list[np.ndarray]:
    """The named inputs as float arrays, checked: finite, positive, one length, enough points."""
    arrays = [np.asarray(v, dtype=np.float64).reshape(-1) for v in named.values()]
    for name, x in zip(named, arrays):
        bad = np.flatnonzero(~(np.isfinite(x) & (x > 0)))
        if bad.size:
            raise ValueError(f"{name} must be finite and positive; got {x[bad[0]]} at index {bad[0]}")
    lengths = {name: x.size for name, x in zip(named, arrays)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have one length, got {lengths}")
    if arrays[0].size < min_points:
        raise ValueError(f"{arrays[0].size} points; the fit needs at least {min_points}")
    return arrays


# ---- L(x) = E + A x^-alpha --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """L(x) = E + A x^-alpha. Standard errors (nan when points == parameters) and, if
    bootstrapped, 95% percentile intervals (else empty), both keyed by "E", "A", "alpha"."""

    E: float
    A: float
    alpha: float
    stderr: dict[str, float]
    ci: dict[str, tuple[float, float]]

    def __call__(self, x):
        return self.E + self.A * np.asarray(x, dtype=np.float64) ** -self.alpha


def _power_law_residuals(theta, log_x, log_loss):
    E, log_A, alpha = theta
    return np.log(E + np.exp(log_A - alpha * log_x)) - log_loss


def _fit_power_law_once(log_x, log_loss):
    # Several starts: E, A and alpha trade off against each other over a short range of x, and
    # a single start can stop in the wrong valley. A is set so each start passes the middle point.
    loss, best = np.exp(log_loss), None
    for alpha in (0.03, 0.1, 0.3, 1.0):
        for E in (0.0, 0.5 * loss.min(), 0.9 * loss.min()):
            log_A = np.log(max(np.median(loss) - E, 1e-3 * loss.min())) + alpha * np.median(log_x)
            r = optimize.least_squares(_power_law_residuals, (E, log_A, alpha), args=(log_x, log_loss),
                                       bounds=([0, -np.inf, 0], np.inf), x_scale="jac",
                                       xtol=1e-12, ftol=1e-12, gtol=1e-12)
            best = r if best is None or r.cost < best.cost else best
    return best


def _bootstrap(names, size, n_draws, seed, refit):
    """Refits on `n_draws` resamples of the points (with replacement): the refits' parameters
    [n_draws, len(names)] and their 95% percentile intervals."""
    rng = np.random.default_rng(seed)
    draws = np.array([refit(rng.integers(0, size, size)) for _ in range(n_draws)]).reshape(n_draws, len(names))
    if not n_draws:
        return draws, {}
    lo, hi = np.percentile(draws, [2.5, 97.5], axis=0)
    return draws, {k: (float(a), float(b)) for k, a, b in zip(names, lo, hi)}


def fit_power_law(x, loss, *, n_bootstrap: int = 0, seed: int = 0) -> PowerLaw:
    """Fits L = E + A x^-alpha to (x, loss) by least squares on log L (relative errors, as losses
    of a sweep are), E >= 0. Standard errors: s^2 (J^T J)^-1 at the optimum, A's by the delta
    method from log A's. `n_bootstrap` > 0 adds percentile intervals from refits on resampled
    points."""
    log_x, log_loss = np.log(_arrays(3, x=x, loss=loss))
    r = _fit_power_law_once(log_x, log_loss)
    dof = log_x.size - 3
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.sqrt(np.abs(np.diag(np.linalg.pinv(r.jac.T @ r.jac))) * (2 * r.cost / dof if dof else np.nan))
    E, log_A, alpha = r.x

    def refit(idx):
        Eb, log_Ab, alphab = _fit_power_law_once(log_x[idx], log_loss[idx]).x
        return Eb, np.exp(log_Ab), alphab

    _, ci = _bootstrap(("E", "A", "alpha"), log_x.size, n_bootstrap, seed, refit)
    stderr = {"E": float(se[0]), "A": float(np.exp(log_A) * se[1]), "alpha": float(se[2])}
    return PowerLaw(float(E), float(np.exp(log_A)), float(alpha), stderr, ci)


# ---- L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla approach 3) -------------------------------

@dataclasses.dataclass(frozen=True)
class Chinchilla:
    """L(N, D) = E + A/N^alpha + B/D^beta with bootstrap standard errors and 95% intervals
    (empty without bootstrap), keyed by "E", "A", "B", "alpha", "beta"."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    stderr: dict[str, float]
    ci: dict[str, tuple[float, float]]

    def __call__(self, n, d):
        n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
        return self.E + self.A * n**-self.alpha + self.B * d**-self.beta

    def optimal_allocation(self, flops, flops_per_param_token: float = 6.0):
        """(N_opt, D_opt) minimising L under C = k N D: N_opt = G (C/k)^(beta/(alpha+beta)),
        G = (alpha A / (beta B))^(1/(alpha+beta)) (Chinchilla eq. 4)."""
        c = np.asarray(flops, dtype=np.float64) / flops_per_param_token
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n_opt = G * c ** (self.beta / (self.alpha + self.beta))
        return n_opt, c / n_opt


def _chinchilla_objective(theta_KxP, log_n, log_d, log_loss, delta):
    """Huber(LSE(a - alpha log N, b - beta log D, e) - log L) summed over points, divided by delta
    (same minimum; keeps the objective near 1 so L-BFGS's relative tolerances bite), for K
    parameter vectors (a, b, e, alpha, beta) at once; and its gradient."""
    a, b, e, alpha, beta = (theta_KxP[:, i:i + 1] for i in range(5))
    terms_KxNx3 = np.stack([a - alpha * log_n, b - beta * log_d, e + 0 * log_n], -1)
    top_KxNx1 = terms_KxNx3.max(-1, keepdims=True)
    exp_KxNx3 = np.exp(terms_KxNx3 - top_KxNx1)
    r_KxN = (top_KxNx1 + np.log(exp_KxNx3.sum(-1, keepdims=True)))[..., 0] - log_loss
    huber_KxN = np.where(np.abs(r_KxN) <= delta, 0.5 * r_KxN**2, delta * (np.abs(r_KxN) - 0.5 * delta))
    # d objective / d term = huber'(r) / delta * softmax(terms); then the chain rule per parameter.
    g_KxNx3 = (np.clip(r_KxN, -delta, delta) / delta)[..., None] * exp_KxNx3 / exp_KxNx3.sum(-1, keepdims=True)
    grad_KxP = np.concatenate([g_KxNx3.sum(1), -(g_KxNx3[..., :2] * np.stack([log_n, log_d], -1)).sum(1)], -1)
    return huber_KxN.sum(-1) / delta, grad_KxP


def _lbfgs(theta0, args):
    def fun(theta):
        f, g = _chinchilla_objective(theta[None], *args)
        return f[0], g[0]
    return optimize.minimize(fun, theta0, jac=True, method="L-BFGS-B",
                             options=dict(maxiter=10_000, ftol=1e-15, gtol=1e-10))


def fit_chinchilla(n, d, loss, *, n_starts: int = 16, n_bootstrap: int = 20, seed: int = 0,
                   delta: float = HUBER_DELTA) -> Chinchilla:
    """Fits L(N, D) as Chinchilla's approach 3. The objective is evaluated on the paper's whole
    grid of starts (4,500 points, vectorised), L-BFGS runs from the `n_starts` best and the
    lowest optimum is kept. Each of `n_bootstrap` resamples of the points restarts from that
    optimum (a resample's optimum is close by; a full grid each time would cost n_starts x)."""
    n, d, loss = _arrays(6, N=n, D=d, loss=loss)
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2:
        raise ValueError("L(N, D) needs at least 2 distinct N and 2 distinct D")
    args = (np.log(n), np.log(d), np.log(loss), delta)
    grid = np.stack([g.ravel() for g in np.meshgrid(*_CHINCHILLA_GRID, indexing="ij")], -1)
    starts = grid[np.argsort(_chinchilla_objective(grid, *args)[0])[:n_starts]]
    best = min((_lbfgs(s, args) for s in starts), key=lambda r: r.fun)

    def natural(theta):  # (a, b, e, alpha, beta) -> (E, A, B, alpha, beta)
        a, b, e, alpha, beta = theta
        return np.array([np.exp(e), np.exp(a), np.exp(b), alpha, beta])

    names = ("E", "A", "B", "alpha", "beta")
    draws, ci = _bootstrap(names, n.size, n_bootstrap, seed,
                           lambda idx: natural(_lbfgs(best.x, tuple(x[idx] for x in args[:3]) + (delta,)).x))
    stderr = draws.std(0, ddof=1) if n_bootstrap > 1 else np.full(5, np.nan)
    return Chinchilla(*map(float, natural(best.x)), stderr=dict(zip(names, map(float, stderr))), ci=ci)


# ---- IsoFLOP profiles (Chinchilla approach 2) -------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Budget:
    """One IsoFLOP profile: its points, the parabola loss = c2 u^2 + c1 u + c0 in u = ln N and
    its minimum; `interior` is False when N_opt lies outside the sizes tried (extrapolated)."""

    flops: float
    n: np.ndarray
    loss: np.ndarray
    coeffs: tuple[float, float, float]
    n_opt: float
    d_opt: float
    loss_opt: float
    interior: bool


@dataclasses.dataclass(frozen=True)
class IsoFlop:
    """Per-budget optima and N_opt = n_coef C^a, D_opt = d_coef C^b with standard errors (nan
    with only 2 budgets)."""

    budgets: list[Budget]
    a: float
    a_stderr: float
    n_coef: float
    b: float
    b_stderr: float
    d_coef: float


def group_budgets(flops: np.ndarray, rtol: float) -> list[np.ndarray]:
    """Indices of the runs of each compute budget: sorted C split where it jumps by more than rtol."""
    # Gaps in sorted log C, not exact equality: a CSV's printed floats may differ in the last digits.
    order = np.argsort(flops)
    cuts = np.flatnonzero(np.diff(np.log(flops[order])) > np.log1p(rtol)) + 1
    return np.split(order, cuts)


def loglog_fit(c, y):
    """ln y = ln k + slope ln c by ordinary least squares: (slope, its standard error (nan with
    2 points), k). A pure power law y = k c^slope, as Kaplan et al. fit L(N)."""
    u, v = np.log(c), np.log(y)
    slope, intercept = np.polyfit(u, v, 1)
    dof = u.size - 2
    rss = np.sum((v - (slope * u + intercept)) ** 2)
    se = np.sqrt(rss / dof / np.sum((u - u.mean()) ** 2)) if dof else np.nan
    return float(slope), float(se), float(np.exp(intercept))


def fit_isoflop(n, loss, flops, *, tokens=None, flops_per_param_token: float = 6.0,
                rtol: float = 0.01) -> IsoFlop:
    """Chinchilla's approach 2. Points whose `flops` agree within `rtol` form one budget C (their
    geometric mean); each budget needs >= 3 sizes and a parabola that opens upwards. D_opt =
    C / (k N_opt), k = `flops_per_param_token` (6: Kaplan's C = 6 N D); or, given the runs'
    `tokens`, D read off the budget's own runs at N_opt (ln D linear in ln N): for small models,
    whose FLOPs per token are far from 6 N (attention, the output head), the tokens they saw."""
    n, loss, flops = _arrays(3, N=n, loss=loss, flops=flops)
    if tokens is not None:
        (tokens,) = _arrays(3, tokens=tokens)
        if tokens.size != n.size:
            raise ValueError(f"tokens has {tokens.size} points, N has {n.size}")
    budgets = []
    for idx in group_budgets(flops, rtol):
        C = float(np.exp(np.log(flops[idx]).mean()))
        if len(np.unique(n[idx])) < 3:
            raise ValueError(f"budget C={C:.3g} FLOPs has {len(np.unique(n[idx]))} distinct sizes; "
                             "a parabola needs at least 3")
        u = np.log(n[idx])
        c2, c1, c0 = np.polyfit(u, loss[idx], 2)
        if c2 <= 0:
            raise ValueError(f"budget C={C:.3g} FLOPs: loss vs log N has no minimum (parabola opens "
                             "downwards); add sizes on both sides of the optimum")
        u_opt = -c1 / (2 * c2)
        n_opt = float(np.exp(u_opt))
        if tokens is None:
            d_opt = C / (flops_per_param_token * n_opt)
        else:
            d_opt = float(np.exp(np.polyval(np.polyfit(u, np.log(tokens[idx]), 1), u_opt)))
        budgets.append(Budget(C, n[idx], loss[idx], (float(c2), float(c1), float(c0)), n_opt,
                              d_opt, float(c0 - c1**2 / (4 * c2)),
                              bool(u.min() <= u_opt <= u.max())))
    if len(budgets) < 2:
        raise ValueError(f"{len(budgets)} compute budget(s); N_opt ~ C^a needs at least 2")
    c = np.array([b.flops for b in budgets])
    a, a_se, n_coef = loglog_fit(c, np.array([b.n_opt for b in budgets]))
    b, b_se, d_coef = loglog_fit(c, np.array([b.d_opt for b in budgets]))
    return IsoFlop(budgets, a, a_se, n_coef, b, b_se, d_coef)


# ---- Learning-rate sweeps --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BestLearningRate:
    """The minimum of a parabola in ln(lr) through the lowest loss and its two neighbours;
    `interior` is False when the lowest loss is at an end of the sweep (then lr is that end)."""

    lr: float
    loss: float
    interior: bool


def best_learning_rate(lr, loss) -> BestLearningRate:
    """Where loss(lr) bottoms out, between the grid points: a sweep half a decade apart only
    brackets the best learning rate, and the parabola through the bracket places it."""
    lr, loss = _arrays(3, lr=lr, loss=loss)
    order = np.argsort(lr)
    lr, loss = lr[order], loss[order]
    i = int(np.argmin(loss))
    if i in (0, lr.size - 1):
        return BestLearningRate(float(lr[i]), float(loss[i]), False)
    u = np.log(lr[i - 1:i + 2])
    c2, c1, c0 = np.polyfit(u, loss[i - 1:i + 2], 2)  # c2 > 0: the middle point is the lowest
    u_opt = float(np.clip(-c1 / (2 * c2), u[0], u[-1]))
    return BestLearningRate(float(np.exp(u_opt)), float(np.polyval((c2, c1, c0), u_opt)), True)


# ---- Plots (PNG through matplotlib's Figure: no pyplot, no global backend, no display needed) ----

def _save(fig: Figure, path) -> str:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    return os.fspath(path)


def _plot_power_law(x, loss, path, fit, xlabel, coef) -> str:
    fit = fit or fit_power_law(x, loss)
    x, loss = np.asarray(x, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    grid = np.geomspace(x.min(), x.max(), 200)
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    ax.scatter(x, loss, s=16, label="runs")
    ax.plot(grid, fit(grid), "k-", label=f"{fit.E:.3g} + {fit.A:.3g} {coef}^-{fit.alpha:.3f}"
                                         f" (±{fit.stderr['alpha']:.3f})")
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="loss")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%g"))  # 3, not 3x10^0, on a log axis spanning less than a decade
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_loss_vs_params(n, loss, path, fit: PowerLaw | None = None) -> str:
    """Loss vs non-embedding parameters with L(N) (fitted here unless given); returns `path`."""
    return _plot_power_law(n, loss, path, fit, "non-embedding parameters N", "N")


def plot_loss_vs_tokens(d, loss, path, fit: PowerLaw | None = None) -> str:
    """Loss vs training tokens with L(D) (fitted here unless given); returns `path`."""
    return _plot_power_law(d, loss, path, fit, "training tokens D", "D")


def plot_isoflop(iso: IsoFlop, path) -> str:
    """Chinchilla figure 3: IsoFLOP profiles with their parabolas and minima, then N_opt(C) and
    D_opt(C) with their power laws; returns `path`."""
    fig = Figure(figsize=(13, 4))
    ax_profiles, ax_n, ax_d = fig.subplots(1, 3)
    colours = [f"C{i % 10}" for i in range(len(iso.budgets))]
    for budget, colour in zip(iso.budgets, colours):
        u = np.linspace(np.log(budget.n).min(), np.log(budget.n).max(), 100)
        ax_profiles.scatter(budget.n, budget.loss, s=14, color=colour)
        ax_profiles.plot(np.exp(u), np.polyval(budget.coeffs, u), color=colour, label=f"{budget.flops:.1e} FLOPs")
        ax_profiles.plot(budget.n_opt, budget.loss_opt, "k*", markersize=9)
    ax_profiles.set(xscale="log", xlabel="non-embedding parameters N", ylabel="loss", title="IsoFLOP profiles")
    ax_profiles.legend(fontsize=7)
    c = np.array([b.flops for b in iso.budgets])
    grid = np.geomspace(c.min(), c.max(), 100)
    for ax, opt, coef, slope, se, name in (
            (ax_n, [b.n_opt for b in iso.budgets], iso.n_coef, iso.a, iso.a_stderr, "N_opt"),
            (ax_d, [b.d_opt for b in iso.budgets], iso.d_coef, iso.b, iso.b_stderr, "D_opt")):
        ax.scatter(c, opt, color=colours, zorder=3)
        ax.plot(grid, coef * grid**slope, "k-", label=f"{name} ∝ C^{slope:.3f} (±{se:.3f})")
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=name)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_lr_sweep(curves: dict, path, best: dict | None = None, legend_title: str = "",
                  xlabel: str = "peak learning rate") -> str:
    """Loss vs learning rate, one line per label (`{label: (lrs, losses)}`, e.g. per width), the
    best learning rate of each (`{label: BestLearningRate}`) starred; returns `path`."""
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    for i, (label, (lrs, losses)) in enumerate(curves.items()):
        order = np.argsort(lrs)
        ax.plot(np.asarray(lrs)[order], np.asarray(losses)[order], "o-", color=f"C{i % 10}", label=str(label))
        if best and label in best:
            ax.plot(best[label].lr, best[label].loss, "*", color=f"C{i % 10}", markersize=12, markeredgecolor="k")
    ax.set(xscale="log", xlabel=xlabel, ylabel="loss")
    ax.legend(fontsize=8, title=legend_title or None, title_fontsize=8)
    return _save(fig, path)


def plot_curves(curves: dict, path, *, xlabel: str, ylabel: str, legend_title: str = "", xscale: str = "linear",
                reference: tuple | None = None, hline: tuple | None = None) -> str:
    """One line per label (`{label: (x, y)}`), e.g. few-shot accuracy vs shots per model size;
    `reference` = (label, x, y) a dashed black line (an ideal), `hline` = (label, y) a dotted one
    (chance); returns `path`."""
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    for i, (label, (x, y)) in enumerate(curves.items()):
        order = np.argsort(x)
        ax.plot(np.asarray(x)[order], np.asarray(y)[order], "o-", color=f"C{i % 10}", label=str(label))
    if reference is not None:
        ax.plot(reference[1], reference[2], "k--", label=reference[0])
    if hline is not None:
        ax.axhline(hline[1], color="gray", linestyle=":", label=hline[0])
    ax.set(xscale=xscale, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8, title=legend_title or None, title_fontsize=8)
    return _save(fig, path)

