"""Correlation metrics: hand-checked values, the logistic fit, and the edge cases' contracts."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy import stats

from qualiclip.metrics import ConstantInputWarning, LogisticFitWarning, correlations, logistic4, logistic_fit


def test_perfect_monotone_is_one_and_reversed_is_minus_one():
    x = np.arange(10.0)
    up = correlations(x, x**3)
    assert up["srcc"] == pytest.approx(1.0) and up["krcc"] == pytest.approx(1.0)
    down = correlations(x, -(x**3))
    assert down["srcc"] == pytest.approx(-1.0) and down["krcc"] == pytest.approx(-1.0)
    assert down["plcc"] < 0 < down["plcc_logistic"]  # the fit absorbs the direction


def test_hand_computed_small_case():
    # Ranks of pred 1,2,3,4 vs target 1,3,2,4: d^2 sum = 2 -> srcc = 1 - 6*2/(4*15) = 0.8;
    # concordant 5, discordant 1 of 6 pairs -> krcc = 4/6.
    out = correlations([1, 2, 3, 4], [10, 30, 20, 40])
    assert out["srcc"] == pytest.approx(0.8)
    assert out["krcc"] == pytest.approx(4 / 6)
    assert out["plcc"] == pytest.approx(0.8)


def test_matches_scipy_on_random_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = 2 * x + rng.normal(size=200)
    out = correlations(x, y)
    assert out["srcc"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert out["krcc"] == pytest.approx(stats.kendalltau(x, y).statistic)
    assert out["plcc"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert set(out) == {"srcc", "krcc", "plcc", "plcc_logistic"}
    assert all(type(v) is float for v in out.values())


def test_logistic_fit_improves_plcc_on_a_nonlinear_monotone_relation():
    rng = np.random.default_rng(1)
    x = np.linspace(-4, 4, 300)
    y = logistic4(x, 5.0, 1.0, 0.5, 0.7) + rng.normal(scale=0.05, size=x.size)
    out = correlations(x, y)
    assert out["plcc_logistic"] > out["plcc"] + 0.02
    assert out["plcc_logistic"] > 0.99
    params, curve = logistic_fit(x, y)
    assert params.shape == (4,)
    assert np.abs(curve(x) - y).mean() < 0.1


def test_logistic_fit_handles_tiny_score_scales():
    # Model scores often live in a narrow band (e.g. 0.40-0.45); the fit must still converge.
    x = np.linspace(0.40, 0.45, 50)
    y = 100 / (1 + np.exp(-(x - 0.425) / 0.005))
    out = correlations(x, y)
    assert out["plcc_logistic"] > 0.99 > out["plcc"]


def test_fewer_than_three_points_names_the_count():
    with pytest.raises(ValueError, match="at least 3 points, got 2"):
        correlations([1, 2], [1, 2])


def test_length_mismatch_and_nan_are_errors():
    with pytest.raises(ValueError, match="pred has 3 values but target has 4"):
        correlations([1, 2, 3], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="pred has 1 non-finite value"):
        correlations([1, np.nan, 3, 4], [1, 2, 3, 4])


def test_constant_input_gives_zeros_with_a_warning_and_valid_json():
    with pytest.warns(ConstantInputWarning, match="pred is constant"):
        out = correlations([2.0] * 5, [1, 2, 3, 4, 5])
    assert out == {"srcc": 0.0, "krcc": 0.0, "plcc": 0.0, "plcc_logistic": 0.0}
    json.dumps(out, allow_nan=False)
    with pytest.warns(ConstantInputWarning, match="target is constant"):
        correlations([1, 2, 3], [7, 7, 7])


def test_failed_fit_falls_back_to_a_linear_map(monkeypatch):
    import qualiclip.metrics as metrics

    def fail(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found")

    monkeypatch.setattr(metrics.optimize, "curve_fit", fail)
    x = np.array([1.0, 2.0, 3.0, 5.0])
    y = np.array([4.0, 3.0, 2.5, 1.0])
    with pytest.warns(LogisticFitWarning):
        params, curve = logistic_fit(x, y)
    assert np.isnan(params).all()
    with pytest.warns(LogisticFitWarning):
        out = correlations(x, y)
    assert out["plcc_logistic"] == pytest.approx(abs(out["plcc"]))


def test_three_points_get_every_correlation_with_a_linear_map():
    # the 4-parameter logistic cannot be fitted to 3 points (scipy raised TypeError, evaluate crashed)
    with pytest.warns(LogisticFitWarning, match="at least 4 points"):
        out = correlations([0.1, 0.5, 0.3], [1.0, 3.0, 2.5])
    assert out["srcc"] == pytest.approx(1.0)
    assert out["plcc_logistic"] == pytest.approx(abs(out["plcc"]))


def test_no_warnings_on_ordinary_data():
    rng = np.random.default_rng(2)
    x = rng.uniform(size=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        correlations(x, x + rng.normal(scale=0.1, size=100))
