"""Pictures for humans of an evaluation: score-vs-level scatter, per-distortion SRCC bars, MOS scatter.

The training figure and the matplotlib setup live in `qualiclip.figures` (the train stage loads
no evaluation code).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .distortions import LEVELS, get_distortion
from .figures import pyplot, save_figure
from .metrics import correlations, logistic_fit


def plot_synthetic_scatter(scores: np.ndarray, s, out: Path) -> Path:
    """Predicted quality per distortion level, one colour per group, with the level means."""
    plt = pyplot()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    groups = np.array([get_distortion(d).group for d in s.distortions])
    jitter = np.random.default_rng(0).uniform(-0.25, 0.25, len(scores))
    for g in dict.fromkeys(groups):
        m = groups == g
        ax.scatter(s.levels[m] + jitter[m], scores[m], s=8, alpha=0.6, label=g)
    means = [scores[s.levels == lv].mean() for lv in LEVELS]
    ax.plot(LEVELS, means, "k-o", lw=2, label="mean")
    ax.set(
        xlabel="distortion level (higher = more degraded)",
        ylabel="predicted quality",
        xticks=LEVELS,
        title="Held-out synthetic set: quality should fall with the level",
    )
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, out)


def plot_per_distortion(
    srcc: dict[str, float], out: Path, baseline: dict[str, float] | None = None, within: dict[str, float] | None = None
) -> Path:
    """Horizontal bars of SRCC (score vs -level) per distortion type, grouped by distortion group;
    the zero-shot baseline's SRCC as a black tick and the mean within-photo SRCC as a hollow
    circle on each bar when given."""
    plt = pyplot()
    out.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(srcc, key=lambda n: (get_distortion(n).group, n))
    groups = [get_distortion(n).group for n in names]
    fig, ax = plt.subplots(figsize=(6.5, 0.28 * len(names) + 1.7), dpi=110)
    vals = [srcc[n] for n in names]
    ax.barh(range(len(names)), vals, color=["tab:green" if v > 0 else "tab:red" for v in vals])
    if baseline:
        ax.scatter([baseline.get(n, np.nan) for n in names], range(len(names)), marker="|", s=120, color="k", zorder=3)
    if within:
        ax.scatter(
            [within.get(n, np.nan) for n in names],
            range(len(names)),
            marker="o",
            s=22,
            facecolors="none",
            edgecolors="k",
            zorder=3,
        )
    ax.set_yticks(range(len(names)), [f"{n}  [{g}]" for n, g in zip(names, groups)], fontsize=7)
    title = "Per-distortion ranking on held-out images\nbar: pooled over photos"
    if within:
        title += " · circle: each photo's 5 levels, averaged"
    if baseline:
        title += "\n(black tick: baseline, the backbone before training, zero-shot)"
    ax.set(xlim=(-1.02, 1.02), xlabel="SRCC(score, -level)")
    ax.set_title(title, fontsize=9, loc="right")  # right-aligned: the long type labels take the left
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    return save_figure(fig, out)


def plot_mos_scatter(
    scores: np.ndarray, mos: np.ndarray, out: Path, *, title: str, mos_range: tuple[float, float] | None = None
) -> Path:
    """Predicted quality vs MOS with the fitted 4-parameter logistic and the correlations."""
    plt = pyplot()
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a failed fit falls back to a line; the legend says so
        params, curve = logistic_fit(scores, mos)
        c = correlations(scores, mos)
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    ax.scatter(scores, mos, s=9, alpha=0.55, color="tab:blue", edgecolors="none")
    xs = np.linspace(scores.min(), scores.max(), 200)
    fit = "4-parameter logistic" if np.all(np.isfinite(params)) else "linear (logistic fit failed)"
    ax.plot(xs, curve(xs), "r-", lw=2, label=f"fitted {fit}")
    ax.set(
        xlabel="predicted quality",
        ylabel="MOS (higher is better)",
        title=f"{title}\nSRCC {c['srcc']:.3f}  KRCC {c['krcc']:.3f}  PLCC {c['plcc']:.3f}  "
        f"PLCC after logistic {c['plcc_logistic']:.3f}",
    )
    if mos_range:
        ax.set_ylim(*mos_range)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, out)


def plot_model_vs_baseline(metrics: dict, out: Path) -> Path:
    """SRCC of the trained model and of the zero-shot baseline on every evaluated set."""
    plt = pyplot()
    out.parent.mkdir(parents=True, exist_ok=True)
    names = [k for k in metrics if isinstance(metrics[k], dict) and "srcc" in metrics[k] and k in metrics["baseline"]]
    model = [metrics[n]["srcc"] for n in names]
    base = [metrics["baseline"][n]["srcc"] for n in names]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(names) + 2), 4), dpi=110)
    x = np.arange(len(names))
    ax.bar(x - 0.2, base, 0.4, color="tab:gray", label="baseline: backbone before training, zero-shot")
    ax.bar(x + 0.2, model, 0.4, color="tab:blue", label="QualiCLIP (this run)")
    for xi, b, m in zip(x, base, model):
        ax.annotate(f"{m - b:+.3f}", (xi + 0.2, max(m, 0)), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [n.replace("_test", "\n(test split)") for n in names])
    ax.set(ylabel="SRCC", ylim=(min(-0.1, min(model + base) - 0.1), 1.05), title="What training added (SRCC)")
    ax.axhline(0, color="k", lw=0.8)
    ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, out)
