"""A paired cluster bootstrap of the promotion metric: how sure is "model A ranks better than B"?

Both models were scored on the same items (synthetic images, or a dataset's images with their
MOS). The independent unit is the pristine photo (``units``): every synthetic sample of one photo
is resampled together, so 120 samples of 1 photo count as 1 photo, not 120. A MOS dataset's unit
is one image. One resample draws the units with replacement; each model's metric is computed on
that same multiset of items (paired), and the difference is recorded. The ``1 - confidence``
quantile of the differences is the one-sided lower bound at ``confidence``.

Resampling is done with integer weights (how often each unit was drawn), vectorised over the
resamples: Pearson's r of the weighted sample, Spearman's rho as Pearson's r of the ranks the
replicated sample would have (ties get their average rank, as scipy.stats.spearmanr does), and
``srcc_within`` as the weighted mean of the per-(photo, type) SRCCs. Seeded: the same inputs and
seed give the same bounds, so the same decision.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.stats import ConstantInputWarning, spearmanr

METRICS = ("srcc", "plcc", "srcc_within")  # the metrics that can be resampled (srcc_within: synthetic only)
CHUNK = 256  # resamples computed at once (memory: CHUNK x items floats)


@dataclass(frozen=True)
class Items:
    """What each scored item is: its target (higher is better: -level, or MOS), its unit (the
    index of its pristine photo; a dataset image is its own unit) and, for ``srcc_within``, its
    (photo, type) group index (None where there are none)."""

    target: np.ndarray
    units: np.ndarray
    groups: np.ndarray | None = None

    @property
    def n_units(self) -> int:
        return int(self.units.max()) + 1 if len(self.units) else 0


def unit_index(keys: list[str]) -> np.ndarray:
    """Integer unit ids 0..U-1 for ``keys`` (one key per item), in order of first appearance."""
    seen: dict[str, int] = {}
    return np.array([seen.setdefault(k, len(seen)) for k in keys], dtype=np.int64)


def point(metric: str, scores: np.ndarray, items: Items) -> float:
    """The metric on every item once (the figure metrics.json holds)."""
    return float(_resampled(metric, np.asarray(scores, float), items, np.ones((1, items.n_units)))[0])


def paired_differences(
    metric: str,
    scores: np.ndarray,
    others: dict[str, np.ndarray],
    items: Items,
    n_resamples: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """``{name: metric(scores) - metric(others[name])}`` for each of ``n_resamples`` resamples of
    the units; every model sees the same resamples."""
    if metric not in METRICS:
        raise ValueError(f"the bootstrap resamples {', '.join(METRICS)}, not '{metric}'")
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_resamples, items.n_units))
    draws = rng.integers(0, items.n_units, size=(n_resamples, items.n_units))
    np.add.at(counts, (np.arange(n_resamples)[:, None], draws), 1.0)
    out: dict[str, list[np.ndarray]] = {name: [] for name in others}
    for lo in range(0, n_resamples, CHUNK):
        c = counts[lo : lo + CHUNK]
        mine = _resampled(metric, np.asarray(scores, float), items, c)
        for name, theirs in others.items():
            out[name].append(mine - _resampled(metric, np.asarray(theirs, float), items, c))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def lower_bound(differences: np.ndarray, confidence: float) -> float:
    """The one-sided lower bound at ``confidence``: the ``1 - confidence`` quantile."""
    return float(np.quantile(differences, 1.0 - confidence))


def upper_bound(differences: np.ndarray, confidence: float) -> float:
    return float(np.quantile(differences, confidence))


def _resampled(metric: str, scores: np.ndarray, items: Items, counts: np.ndarray) -> np.ndarray:
    """The metric under each row of ``counts`` (how often each unit was drawn): shape (rows,)."""
    if metric == "srcc_within":
        if items.groups is None:
            raise ValueError("srcc_within needs the (photo, type) groups of the synthetic set")
        within, group_unit = _within(scores, items)
        w = counts[:, group_unit]
        return (w * within).sum(axis=1) / w.sum(axis=1)
    w = counts[:, items.units]  # (rows, items)
    if metric == "plcc":
        return _weighted_pearson(scores, items.target, w)
    return _weighted_pearson(_weighted_ranks(scores, w), _weighted_ranks(items.target, w), w)


def _within(scores: np.ndarray, items: Items) -> tuple[np.ndarray, np.ndarray]:
    """Each group's SRCC against the target (a constant group: 0, as evaluate counts it) and its unit."""
    assert items.groups is not None
    n = int(items.groups.max()) + 1
    srcc, unit = np.zeros(n), np.zeros(n, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        for g in range(n):
            idx = np.flatnonzero(items.groups == g)
            rho = spearmanr(scores[idx], items.target[idx])[0]
            srcc[g] = 0.0 if rho is None or np.isnan(rho) else rho
            unit[g] = items.units[idx[0]]
    return srcc, unit


def _weighted_ranks(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The average rank (1-based) each item would have in the sample that repeats it w times."""
    order = np.argsort(x, kind="stable")
    xs = np.asarray(x)[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # first index of each run of ties
    tie = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(xs)]))
    cum = np.cumsum(w[:, order], axis=1)
    ends = np.r_[starts[1:], len(xs)] - 1
    below = np.where(starts > 0, cum[:, np.maximum(starts - 1, 0)], 0.0)  # weight of strictly smaller values
    equal = cum[:, ends] - below
    ranks_sorted = (below + (equal + 1.0) / 2.0)[:, tie]
    ranks = np.empty_like(ranks_sorted)
    ranks[:, order] = ranks_sorted
    return ranks


def _weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pearson's r of each weighted sample; 0 where either side is constant (as evaluate counts it)."""
    x = np.broadcast_to(x, w.shape)
    y = np.broadcast_to(y, w.shape)
    total = w.sum(axis=1, keepdims=True)
    dx = x - (w * x).sum(axis=1, keepdims=True) / total
    dy = y - (w * y).sum(axis=1, keepdims=True) / total
    cov = (w * dx * dy).sum(axis=1)
    var = (w * dx * dx).sum(axis=1) * (w * dy * dy).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.sqrt(var)
    return np.where(var > 0, r, 0.0)
