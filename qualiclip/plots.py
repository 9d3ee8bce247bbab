"""Pictures for humans: score-vs-level scatter and per-distortion SRCC bars."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    return plt


def plot_synthetic_scatter(scores: np.ndarray, s, out: Path) -> Path:
    """Predicted quality per distortion level, one colour per group, with the level means."""
    from .distortions import get_distortion

    plt = _pyplot()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    groups = np.array([get_distortion(d).group for d in s.distortions])
    jitter = np.random.default_rng(0).uniform(-0.25, 0.25, len(scores))
    for g in dict.fromkeys(groups):
        m = groups == g
        ax.scatter(s.levels[m] + jitter[m], scores[m], s=8, alpha=0.6, label=g)
    means = [scores[s.levels == lv].mean() for lv in range(1, 6)]
    ax.plot(range(1, 6), means, "k-o", lw=2, label="mean")
    ax.set(xlabel="distortion level (higher = more degraded)", ylabel="predicted quality", xticks=range(1, 6),
           title="Held-out synthetic set: quality should fall with the level")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_per_distortion(srcc: dict[str, float], out: Path) -> Path:
    """Horizontal bars of SRCC (score vs -level) per distortion type."""
    plt = _pyplot()
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list(srcc)
    fig, ax = plt.subplots(figsize=(6, 0.28 * len(names) + 1.2), dpi=110)
    vals = [srcc[n] for n in names]
    ax.barh(names, vals, color=["tab:green" if v > 0 else "tab:red" for v in vals])
    ax.set(xlim=(-1, 1), xlabel="SRCC(score, -level)", title="Per-distortion ranking on held-out images")
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_loss_curves(log_csv: Path, out: Path) -> Path:
    """Loss terms per step from the train stage's CSV log."""
    import csv

    plt = _pyplot()
    with open(log_csv) as f:
        rows = list(csv.DictReader(f))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = [int(r["step"]) for r in rows]
    for key in ("loss", "loss_cons", "loss_pos", "loss_neg"):
        ax.plot(steps, [float(r[key]) for r in rows], label=key, lw=1.2)
    ax.set(xlabel="step", ylabel="loss", title="Training losses")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
