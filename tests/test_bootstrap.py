"""The paired cluster bootstrap of the promotion gate (qualiclip.pipeline.bootstrap), by hand."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr

from qualiclip.evaluate import SyntheticSet, synthetic_metrics
from qualiclip.pipeline.bootstrap import Items, _resampled, paired_differences, point, unit_index


def synthetic(n_photos: int = 6, seed: int = 0):
    """Items of ``n_photos`` photos x 2 types x 5 levels, and scores with ties (rounded)."""
    rng = np.random.default_rng(seed)
    photos = [f"p{p}" for p in range(n_photos) for _ in range(10)]
    types = [t for _ in range(n_photos) for t in ("blur", "jpeg") for _ in range(5)]
    levels = np.tile(np.arange(1, 6), 2 * n_photos).astype(float)
    items = Items(-levels, unit_index(photos), unit_index([f"{p}/{t}" for p, t in zip(photos, types)]))
    scores = np.round(-levels + rng.normal(size=len(levels)), 1)
    return items, scores, SyntheticSet([], photos, types, levels.astype(int))


def test_point_figures_are_the_evaluate_stages():
    items, scores, s = synthetic()
    m = synthetic_metrics(scores, s)
    assert abs(point("srcc", scores, items) - m["srcc"]) < 1e-12
    assert abs(point("plcc", scores, items) - m["plcc"]) < 1e-12
    assert abs(point("srcc_within", scores, items) - m["srcc_within"]) < 1e-12


def test_a_resample_is_the_replicated_sample_with_photos_moving_together():
    items, scores, _ = synthetic()
    counts = np.array([[2.0, 0, 1, 0, 3, 0]])
    rep = np.concatenate([np.flatnonzero(items.units == u) for u in range(6) for _ in range(int(counts[0, u]))])
    target = items.target
    assert abs(_resampled("srcc", scores, items, counts)[0] - spearmanr(scores[rep], target[rep])[0]) < 1e-12
    assert abs(_resampled("plcc", scores, items, counts)[0] - pearsonr(scores[rep], target[rep])[0]) < 1e-12


def test_seeded_and_paired():
    items, scores, _ = synthetic()
    a = paired_differences("srcc", scores, {"same": scores, "x": -scores}, items, 500, seed=3)
    b = paired_differences("srcc", scores, {"same": scores, "x": -scores}, items, 500, seed=3)
    assert np.array_equal(a["x"], b["x"]) and not np.array_equal(
        a["x"], paired_differences("srcc", scores, {"x": -scores}, items, 500, seed=4)["x"]
    )
    assert np.all(a["same"] == 0.0)  # paired: a model against itself differs by exactly 0 on every resample
