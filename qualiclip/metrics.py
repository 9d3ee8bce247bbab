"""Agreement between predicted quality scores and subjective scores (SRCC, KRCC, PLCC).

Conventions (docs/method.md, "The evaluation protocol"):
- ``srcc``, ``krcc`` and ``plcc`` are computed on the raw scores, so their sign says whether the
  prediction agrees with the MOS direction (targets are expected higher-is-better, as
  `qualiclip.datasets` provides them).
- ``plcc_logistic`` is Pearson's r between the MOS and the prediction mapped through the
  VQEG 4-parameter logistic ``f(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2`` fitted by least
  squares. The fit absorbs the direction, so this value is never below 0 on a successful fit.
- A constant input (all predictions or all targets equal) has no ranking: every correlation is
  reported as 0.0 with a `ConstantInputWarning`, never NaN, so ``metrics.json`` stays valid JSON.
- Non-finite values are an error (a NaN score is a bug upstream, not something to average over).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy import optimize, stats

MIN_POINTS = 3
LOGISTIC_PARAMS = 4  # b1..b4 of logistic4
CORRELATION_KEYS = ("srcc", "krcc", "plcc", "plcc_logistic")


class ConstantInputWarning(UserWarning):
    """One of the inputs is constant, so correlations are undefined and reported as 0.0."""


class LogisticFitWarning(UserWarning):
    """The 4-parameter logistic fit failed; a linear least-squares map was used instead."""


def correlations(pred, target) -> dict[str, float]:
    """SRCC, KRCC, PLCC and logistic-fitted PLCC between ``pred`` and ``target``.

    ``pred`` and ``target`` are 1-D sequences of equal length >= 3 with finite values.
    Returns ``{'srcc', 'krcc', 'plcc', 'plcc_logistic'}`` as Python floats. Raises ValueError on
    fewer than 3 points, unequal lengths or non-finite values. Constant input gives 0.0 for all
    four with a `ConstantInputWarning`.
    """
    x, y = _as_pair(pred, target)
    if _is_constant(x) or _is_constant(y):
        which = "pred" if _is_constant(x) else "target"
        warnings.warn(
            f"{which} is constant over {x.size} points: correlations reported as 0.0",
            ConstantInputWarning,
            stacklevel=2,
        )
        return {key: 0.0 for key in CORRELATION_KEYS}
    _, curve = logistic_fit(x, y)
    return {
        "srcc": float(stats.spearmanr(x, y).statistic),
        "krcc": float(stats.kendalltau(x, y).statistic),
        "plcc": float(stats.pearsonr(x, y).statistic),
        "plcc_logistic": _pearson_or_zero(curve(x), y),
    }


def logistic4(x, b1: float, b2: float, b3: float, b4: float):
    """VQEG 4-parameter logistic: increasing in ``x`` when ``b1 > b2``, decreasing otherwise."""
    z = -(np.asarray(x, dtype=float) - b3) / max(abs(b4), 1e-12)
    with np.errstate(over="ignore"):  # exp overflow -> inf -> the curve's lower asymptote b2
        return (b1 - b2) / (1.0 + np.exp(z)) + b2


def logistic_fit(pred, target) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Fit `logistic4` mapping ``pred`` onto ``target``; return ``(params, curve)``.

    ``params`` is ``[b1, b2, b3, b4]`` and ``curve(x)`` evaluates the fitted logistic, e.g. to draw
    it over a scatter plot. With fewer than 4 points, or if the fit does not converge or yields a
    non-finite or constant mapping, a `LogisticFitWarning` is issued, ``params`` is all NaN and ``curve`` is the linear
    least-squares map of ``pred`` onto ``target`` (so ``plcc_logistic`` falls back to ``|plcc|``).
    Same input contract as `correlations`.
    """
    x, y = _as_pair(pred, target)
    if x.size < LOGISTIC_PARAMS:  # curve_fit cannot fit 4 parameters to fewer points
        warnings.warn(
            f"logistic fit needs at least {LOGISTIC_PARAMS} points, got {x.size}; using a linear map instead",
            LogisticFitWarning,
            stacklevel=2,
        )
        return np.full(LOGISTIC_PARAMS, np.nan), _linear_curve(x, y)
    # Fit on standardised scores: model outputs often span a narrow band (0.40-0.45), and
    # MINPACK's finite-difference step is relative to each parameter, so a centre that starts
    # at ~1e-16 instead of exactly 0 would never move.
    centre, scale = float(np.mean(x)), float(np.std(x)) or 1.0
    z = (x - centre) / scale
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            pz, _ = optimize.curve_fit(logistic4, z, y, p0=_initial_params(z, y), maxfev=20000)
        params = np.array([pz[0], pz[1], pz[2] * scale + centre, abs(pz[3]) * scale])
        fitted = logistic4(x, *params)
        if not np.all(np.isfinite(fitted)) or _is_constant(fitted):
            raise RuntimeError("fitted curve is non-finite or flat")
    except (RuntimeError, ValueError, np.linalg.LinAlgError) as exc:
        warnings.warn(f"logistic fit failed ({exc}); using a linear map instead", LogisticFitWarning, stacklevel=2)
        return np.full(4, np.nan), _linear_curve(x, y)
    return params, lambda v: logistic4(v, *params)


def _initial_params(z: np.ndarray, y: np.ndarray) -> list[float]:
    # For standardised z: asymptotes at the target extremes, ordered by the direction of the
    # relation so the optimiser starts on the right branch; centre 0 and unit slope.
    lo, hi = float(y.min()), float(y.max())
    increasing = stats.spearmanr(z, y).statistic >= 0
    return [hi, lo, 0.0, 1.0] if increasing else [lo, hi, 0.0, 1.0]


def _linear_curve(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    slope, intercept = np.polyfit(x, y, 1)
    return lambda v: slope * np.asarray(v, dtype=float) + intercept


def _pearson_or_zero(a: np.ndarray, b: np.ndarray) -> float:
    return 0.0 if _is_constant(a) else float(stats.pearsonr(a, b).statistic)


def _is_constant(a: np.ndarray) -> bool:
    return bool(np.ptp(a) == 0.0)


def _as_pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(pred, dtype=float).reshape(-1)
    y = np.asarray(target, dtype=float).reshape(-1)
    if x.size != y.size:
        raise ValueError(f"pred has {x.size} values but target has {y.size}: pass one score per MOS")
    if x.size < MIN_POINTS:
        raise ValueError(f"correlations need at least {MIN_POINTS} points, got {x.size}")
    for name, a in (("pred", x), ("target", y)):
        bad = np.flatnonzero(~np.isfinite(a))
        if bad.size:
            raise ValueError(
                f"{name} has {bad.size} non-finite value(s), first at index {bad[0]}: "
                "fix or drop them before computing correlations"
            )
    return x, y
