"""Matplotlib without a display, and the training figure.

The train stage draws one figure, the loss curves; it lives here, apart from the evaluation's
figures (`qualiclip.plots`, which need the metrics and the distortion table), so that training
loads no evaluation code and an edit to an evaluation plot does not make DVC retrain.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on servers).

    Imported on first use, not with this module: choosing the backend is process-wide, and
    importing qualiclip must not change it for a notebook that only scores images.
    """
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path) -> Path:
    """Lay out, write and close a figure (figures are never left open in long runs)."""
    fig.tight_layout()
    fig.savefig(out)
    pyplot().close(fig)
    return out


def plot_loss_curves(log_csv: Path, out: Path) -> Path:
    """Loss terms per step from the train stage's CSV log."""
    plt = pyplot()
    with open(log_csv) as f:
        rows = list(csv.DictReader(f))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = [int(r["step"]) for r in rows]
    for key in ("loss", "loss_cons", "loss_pos", "loss_neg"):
        ax.plot(steps, [float(r[key]) for r in rows], label=key, lw=1.2)
    ax.set(xlabel="step", ylabel="loss", title="Training losses")
    ax.legend()
    return save_figure(fig, out)
