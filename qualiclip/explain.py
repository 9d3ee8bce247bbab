"""Quality maps: where an image looks bad, from scores on a sliding window of patches.

Each ``patch × patch`` window (stride ``stride``; the last row and column are moved flush with
the border so every pixel is covered) is scored like a whole image; a pixel's value in the map
is the mean score of the windows that cover it. The model is fully convolutional up to its
attention pool, so a patch score is what the model says about that region alone. The global
score is the model's score of the whole image, as ``qualiclip score`` gives it.

The command line ``qualiclip explain IMAGE --out map.png [--model CKPT] [--patch 224 --stride 112]``
is `qualiclip.pipeline.explain_cli`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.patches import Rectangle
from mpl_toolkits.axes_grid1 import make_axes_locatable

from .batching import score_arrays, scoring_device
from .errors import QualiclipError
from .figures import pyplot
from .inference import inference_copy
from .memory import image_problem, memory_budget


class ExplainError(QualiclipError, ValueError):
    """A patch/stride setting that cannot work; the message names the fix."""


@dataclass(frozen=True)
class QualityMap:
    """Patch scores ``(rows, cols)``; patch (i, j) covers ``[ys[i], ys[i]+patch) × [xs[j], xs[j]+patch)``."""

    scores: np.ndarray
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    patch: int
    global_score: float

    def heat(self, height: int, width: int) -> np.ndarray:
        """(height, width) map: per pixel, the mean score of the patches covering it."""
        total = np.zeros((height, width))
        count = np.zeros((height, width))
        for i, y in enumerate(self.ys):
            for j, x in enumerate(self.xs):
                total[y : y + self.patch, x : x + self.patch] += self.scores[i, j]
                count[y : y + self.patch, x : x + self.patch] += 1
        return total / np.maximum(count, 1)

    def worst(self) -> tuple[int, int, float]:
        """(y, x, score) of the lowest-scoring patch."""
        i, j = np.unravel_index(int(np.argmin(self.scores)), self.scores.shape)
        return self.ys[i], self.xs[j], float(self.scores[i, j])


def window_starts(length: int, patch: int, stride: int) -> list[int]:
    """Starts of the windows along one axis, the last one flush with the end."""
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


def quality_map(
    model,
    image: np.ndarray,
    *,
    patch: int = 224,
    stride: int = 112,
    batch_size: int = 16,
    device=None,
    precision: str = "fp32",
    max_memory: int | None = None,
) -> QualityMap:
    """Score every window of ``image`` ((H, W, 3) uint8 RGB) and the whole image.

    A patch larger than the image is reduced to the image's shorter side. An image the model
    cannot score whole (too small, or above ``max_memory`` bytes: `memory.image_problem`)
    raises `ExplainError` before any patch is scored.
    """
    if patch < 16 or stride < 1:
        raise ExplainError(f"--patch must be >= 16 and --stride >= 1, got patch {patch}, stride {stride}")
    h, w = image.shape[:2]
    scorer = inference_copy(model).to(scoring_device(model, device))
    budget = memory_budget(max_memory, scorer.prompt_features.device)
    if problem := image_problem(scorer, image.shape, budget):
        raise ExplainError(f"cannot explain this image: {problem}")
    patch = min(patch, h, w)
    if patch < scorer.min_side:
        raise ExplainError(
            f"--patch {patch} is below the {scorer.min_side} px the image encoder needs — "
            f"use --patch {scorer.min_side} or more"
        )
    ys, xs = window_starts(h, patch, stride), window_starts(w, patch, stride)
    crops = [image[y : y + patch, x : x + patch] for y in ys for x in xs]  # views, no copies
    common = dict(batch_size=batch_size, device=device, precision=precision, max_memory=budget)
    scores = score_arrays(scorer, crops, **common).reshape(len(ys), len(xs))
    global_score = float(score_arrays(scorer, [image], **common)[0])
    return QualityMap(scores, tuple(ys), tuple(xs), patch, global_score)


def render_quality_map(
    qmap: QualityMap, image: np.ndarray, out: Path, *, stride: int | None = None, name: str = ""
) -> Path:
    """The image with the map overlaid (red = worst), the worst patch outlined, scores in the title."""
    plt = pyplot()
    h, w = image.shape[:2]
    fig, ax = plt.subplots(figsize=(8, 7.2 * h / w + 0.8), dpi=110)
    ax.imshow(image)
    lo, hi = float(qmap.scores.min()), float(qmap.scores.max())
    heat = ax.imshow(qmap.heat(h, w), cmap="RdYlGn", alpha=0.45, vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
    y, x, worst = qmap.worst()
    ax.add_patch(Rectangle((x, y), qmap.patch, qmap.patch, fill=False, ec="black", lw=2, ls="--"))
    cax = make_axes_locatable(ax).append_axes("right", size="3%", pad=0.08)  # as tall as the image
    fig.colorbar(heat, cax=cax, label="patch quality (higher is better)")
    window = f"patch {qmap.patch}" + (f", stride {stride}" if stride else "")
    ax.set_title(
        f"{name + ': ' if name else ''}quality {qmap.global_score:.3f} (whole image)\n"
        f"patches {lo:.3f}–{hi:.3f}, worst outlined ({worst:.3f}); {window}",
        fontsize=10,
    )
    ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def write_patch_csv(qmap: QualityMap, out: Path) -> Path:
    """The patch scores as CSV rows (y, x, size, score), one per window."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["y", "x", "size", "score"])
        for i, y in enumerate(qmap.ys):
            for j, x in enumerate(qmap.xs):
                w.writerow([y, x, qmap.patch, round(float(qmap.scores[i, j]), 6)])
    return out
