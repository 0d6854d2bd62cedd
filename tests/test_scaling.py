"""Tests for llm_jax.scaling: counts, power-law / Chinchilla / IsoFLOP fits on synthetic data
with known answers, plots, and the errors bad input gets."""
import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from scipy import optimize

from llm_jax import config_lib, metrics, scaling
from llm_jax.model import Transformer, TransformerConfig, parameter_counts

# Chinchilla's fitted L(N, D) (Hoffmann et al. 2022, eq. 10): the truth the synthetic data follow.
TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_power_law(E, A, alpha, noise=0.005, seed=0):
    rng = np.random.default_rng(seed)
    n = np.geomspace(1e6, 1e10, 20)
    return n, (E + A * n**-alpha) * np.exp(rng.normal(0, noise, n.size))


def chinchilla_grid(noise=0.005, seed=0):
    rng = np.random.default_rng(seed)
    n, d = (g.ravel() for g in np.meshgrid(np.geomspace(1e7, 1e10, 8), np.geomspace(1e9, 1e12, 8)))
    loss = (TRUE["E"] + TRUE["A"] * n**-TRUE["alpha"] + TRUE["B"] * d**-TRUE["beta"])
    return n, d, loss * np.exp(rng.normal(0, noise, n.size))


def isoflop_sweep(noise=0.001, seed=0, sizes=9):
    """Budgets 1e18..1e22, `sizes` models per budget from 1/8 to 8 x the analytic optimum."""
    rng = np.random.default_rng(seed)
    truth = scaling.Chinchilla(**TRUE, stderr={}, ci={})
    n, flops = [], []
    for C in np.geomspace(1e18, 1e22, 5):
        n_opt, _ = truth.optimal_allocation(C)
        n += list(n_opt * np.geomspace(1 / 8, 8, sizes))
        flops += [C] * sizes
    n, flops = np.array(n), np.array(flops)
    loss = truth(n, flops / (6 * n)) * np.exp(rng.normal(0, noise, n.size))
    return truth, n, loss, flops


def tiny_cfg(style):
    config = config_lib.base_config()
    config.model.size, config.model.style = "nano", style
    return TransformerConfig.from_config(config.model, vocab_size=259, seq_len=32)


# ---------------------------------------------------------------------------- counts

@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_counts_match_an_initialised_model(style):
    cfg = tiny_cfg(style)
    # Jitted: one compile is quicker than dispatching every initialiser eagerly.
    params = nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    assert scaling.count_params(cfg) == parameter_counts(params)
    assert scaling.non_embedding_params(cfg) == parameter_counts(params)["non_embedding"]


def test_training_flops_is_flops_per_token_times_tokens():
    cfg = tiny_cfg("gpt2")
    assert scaling.training_flops(cfg, 1e6) == metrics.flops_per_token(cfg, 32) * 1e6
    assert scaling.training_flops(cfg, 1e6, seq_len=16) == metrics.flops_per_token(cfg, 16) * 1e6
    # 6 N D is a lower bound: the head and attention come on top.
    assert scaling.training_flops(cfg, 1e6) > 6 * scaling.non_embedding_params(cfg) * 1e6


# ---------------------------------------------------------------------------- L(N)

@pytest.mark.parametrize("E,A,alpha", [(1.0, 11.4, 0.076), (1.69, 406.4, 0.34)])
def test_power_law_recovers_parameters_within_their_errors(E, A, alpha):
    n, loss = synthetic_power_law(E, A, alpha)
    fit = scaling.fit_power_law(n, loss)
    for name, true in dict(E=E, A=A, alpha=alpha).items():
        assert abs(getattr(fit, name) - true) < 3 * fit.stderr[name], (name, getattr(fit, name), fit.stderr)
    # Sensible errors: tight enough to mean something (0.5% noise on 20 points over 4 decades).
    assert fit.stderr["alpha"] < 0.1 * alpha
    assert abs(fit.alpha - alpha) < 0.15 * alpha


def test_power_law_exact_data_and_bootstrap_interval():
    n = np.geomspace(1e3, 1e9, 12)
    fit = scaling.fit_power_law(n, 2.0 + 50.0 * n**-0.3)
    np.testing.assert_allclose([fit.E, fit.A, fit.alpha], [2.0, 50.0, 0.3], rtol=1e-6)
    np.testing.assert_allclose(fit(n), 2.0 + 50.0 * n**-0.3, rtol=1e-8)
    d, loss = synthetic_power_law(1.69, 410.7, 0.28, seed=1)
    boot = scaling.fit_power_law(d, loss, n_bootstrap=10)
    lo, hi = boot.ci["alpha"]
    assert lo < boot.alpha < hi and hi - lo < 0.05


# ---------------------------------------------------------------------------- L(N, D)

def test_chinchilla_fit_recovers_parameters():
    n, d, loss = chinchilla_grid()
    fit = scaling.fit_chinchilla(n, d, loss, n_starts=4, n_bootstrap=10)
    for name, true in TRUE.items():
        got, se = getattr(fit, name), fit.stderr[name]
        assert abs(got - true) < 3 * se, (name, got, se)
        assert fit.ci[name][0] < got < fit.ci[name][1]
    assert abs(fit.alpha - TRUE["alpha"]) < 0.02 and abs(fit.beta - TRUE["beta"]) < 0.02
    assert abs(fit.E - TRUE["E"]) < 0.05


def test_chinchilla_objective_gradient_matches_finite_differences():
    n, d, loss = chinchilla_grid()
    args = (np.log(n), np.log(d), np.log(loss), scaling.HUBER_DELTA)
    theta = np.array([6.0, 6.5, 0.4, 0.3, 0.25])  # (a, b, e, alpha, beta), residuals beyond delta
    _, grad = scaling._chinchilla_objective(theta[None], *args)
    numeric = optimize.approx_fprime(theta, lambda t: scaling._chinchilla_objective(t[None], *args)[0][0], 1e-7)
    np.testing.assert_allclose(grad[0], numeric, rtol=1e-4, atol=1e-4)


def test_chinchilla_optimal_allocation_minimises_loss_on_the_budget():
    fit = scaling.Chinchilla(**TRUE, stderr={}, ci={})
    C = 1e21
    n_opt, d_opt = fit.optimal_allocation(C)
    assert n_opt * d_opt * 6 == pytest.approx(C)
    n = n_opt * np.array([0.9, 1.0, 1.1])
    assert np.argmin(fit(n, C / (6 * n))) == 1


# ---------------------------------------------------------------------------- IsoFLOP

def test_isoflop_recovers_the_analytic_optimum_and_exponents():
    truth, n, loss, flops = isoflop_sweep()
    iso = scaling.fit_isoflop(n, loss, flops)
    assert len(iso.budgets) == 5 and all(b.interior for b in iso.budgets)
    for budget in iso.budgets:
        n_opt, d_opt = truth.optimal_allocation(budget.flops)
        assert budget.n_opt == pytest.approx(n_opt, rel=0.1)
        assert budget.d_opt == pytest.approx(d_opt, rel=0.1)
    a = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])  # 0.4516
    assert abs(iso.a - a) < 0.01 and abs(iso.a - a) < 4 * iso.a_stderr + 1e-3
    assert abs(iso.b - (1 - a)) < 0.01
    assert iso.a + iso.b == pytest.approx(1.0)  # D_opt = C / (6 N_opt)


def test_isoflop_groups_budgets_printed_with_rounding():
    _, n, loss, flops = isoflop_sweep(noise=0.0)
    jittered = flops * (1 + 1e-6 * (np.arange(flops.size) % 3))  # as a CSV might print them
    assert len(scaling.fit_isoflop(n, loss, jittered).budgets) == 5


def test_isoflop_reads_d_opt_off_the_runs_tokens_when_given():
    truth, n, loss, flops = isoflop_sweep()
    # Runs that spent their budget at 8 FLOPs per parameter and token saw 6/8 of C / (6 N) tokens.
    tokens = flops / (8 * n)
    iso = scaling.fit_isoflop(n, loss, flops, tokens=tokens)
    for budget in iso.budgets:
        assert budget.d_opt == pytest.approx(budget.flops / (8 * budget.n_opt), rel=1e-6)
    assert iso.b == pytest.approx(1 - iso.a, abs=1e-6)
    with pytest.raises(ValueError, match="tokens has 3 points"):
        scaling.fit_isoflop(n, loss, flops, tokens=tokens[:3])


def test_best_learning_rate_is_the_parabola_minimum_between_grid_points():
    lr = np.array([1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    u_true = np.log(2e-3)
    loss = 3.0 + 0.2 * (np.log(lr) - u_true) ** 2  # a parabola in ln lr: exactly recovered
    best = scaling.best_learning_rate(lr[::-1], loss[::-1])  # any order
    assert best.interior and best.lr == pytest.approx(2e-3, rel=1e-6) and best.loss == pytest.approx(3.0)
    edge = scaling.best_learning_rate(lr, np.array([5.0, 4.0, 3.5, 3.2, 3.1]))  # still falling
    assert not edge.interior and edge.lr == 1e-2


# ---------------------------------------------------------------------------- CSV rows

def test_rows_from_a_sweep_csv_feed_the_fits(tmp_path):
    _, n, loss, flops = isoflop_sweep()
    path = tmp_path / "study.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=scaling.CSV_COLUMNS)
        writer.writeheader()
        for row in zip(n, flops / (6 * n), flops, loss):
            writer.writerow(dict(zip(scaling.CSV_COLUMNS, (repr(float(x)) for x in row))))
    rows = scaling.read_rows(path)
    n2, loss2, flops2 = scaling.columns(rows, "params_non_embedding", "eval_loss", "flops")
    np.testing.assert_array_equal(n2, n)
    assert scaling.fit_isoflop(n2, loss2, flops2).a == pytest.approx(scaling.fit_isoflop(n, loss, flops).a)


# ---------------------------------------------------------------------------- plots

def test_plots_are_png_files(tmp_path):
    n, loss = synthetic_power_law(1.69, 406.4, 0.34)
    iso = scaling.fit_isoflop(*isoflop_sweep()[1:])
    paths = [scaling.plot_loss_vs_params(n, loss, tmp_path / "n.png"),
             scaling.plot_loss_vs_tokens(n * 20, loss, tmp_path / "d.png",
                                         fit=scaling.fit_power_law(n * 20, loss)),
             scaling.plot_isoflop(iso, tmp_path / "isoflop.png"),
             scaling.plot_lr_sweep({64: ([1e-3, 3e-3, 1e-2], [3.0, 2.9, 3.1])}, tmp_path / "lr.png",
                                   best={64: scaling.best_learning_rate([1e-3, 3e-3, 1e-2], [3.0, 2.9, 3.1])})]
    assert paths == [str(tmp_path / name) for name in ("n.png", "d.png", "isoflop.png", "lr.png")]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC


# ---------------------------------------------------------------------------- bad input

def test_bad_input_is_named():
    n, loss = synthetic_power_law(1.69, 406.4, 0.34)
    with pytest.raises(ValueError, match="2 points; the fit needs at least 3"):
        scaling.fit_power_law(n[:2], loss[:2])
    with pytest.raises(ValueError, match="loss must be finite and positive; got -1.0 at index 4"):
        scaling.fit_power_law(n, np.where(np.arange(n.size) == 4, -1.0, loss))
    with pytest.raises(ValueError, match="x must be finite and positive; got 0.0 at index 0"):
        scaling.fit_power_law(np.r_[0.0, n[1:]], loss)
    with pytest.raises(ValueError, match=r"inputs must have one length, got \{'x': 20, 'loss': 19\}"):
        scaling.fit_power_law(n, loss[:-1])
    nn_, d, loss3 = chinchilla_grid()
    with pytest.raises(ValueError, match="D must be finite and positive; got nan"):
        scaling.fit_chinchilla(nn_, np.r_[np.nan, d[1:]], loss3)
    with pytest.raises(ValueError, match="5 points; the fit needs at least 6"):
        scaling.fit_chinchilla(nn_[:5], d[:5], loss3[:5])
    with pytest.raises(ValueError, match="2 distinct D"):
        scaling.fit_chinchilla(nn_[:8], np.full(8, 1e9), loss3[:8])


def test_isoflop_bad_budgets_are_named():
    _, n, loss, flops = isoflop_sweep(sizes=3)
    with pytest.raises(ValueError, match=r"budget C=1e\+18 FLOPs has 2 distinct sizes"):
        scaling.fit_isoflop(n[1:], loss[1:], flops[1:])
    with pytest.raises(ValueError, match="1 compute budget"):
        scaling.fit_isoflop(n[:3], loss[:3], flops[:3])
    with pytest.raises(ValueError, match="opens downwards"):
        scaling.fit_isoflop(n[:6], np.r_[1.0, 2.0, 1.0, loss[3:6]], flops[:6])


def test_columns_name_the_bad_row():
    with pytest.raises(ValueError, match="row 1 has no column 'loss'"):
        scaling.columns([{"loss": "1"}, {"tokens": "2"}], "loss")
    with pytest.raises(ValueError, match="row 0: column 'loss' is not a number: ''"):
        scaling.columns([{"loss": ""}], "loss")
