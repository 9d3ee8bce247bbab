"""Scoring image files (what ``qualiclip score``, the evaluation and the served model call).

`score_paths(paths, model)` streams the files: grouped by header size over the whole list
(`probe_size`), decoded one batch at a time (at most ``batch_size`` decoded images held at once),
each checked against the scorer (`memory.image_problem`) before it is resized, scored by
`batching.score_arrays`. An unreadable or unscorable file gets an ``error``, never an exception.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from .batching import plan_batches, precision_autocast, score_arrays, scoring_device
from .files import open_regular
from .imageio import DEFAULT_MAX_PIXELS, ImageReadError, read_image
from .inference import inference_copy
from .memory import image_problem, memory_budget
from .model import QualiCLIP


@dataclass(frozen=True)
class FileScore:
    """One file's result: ``score`` None and ``error`` set when the file could not be scored.
    ``width``/``height`` are the decoded (upright) size, before any evaluation resize."""

    path: Path
    score: float | None
    width: int | None
    height: int | None
    error: str = ""


def probe_size(path: Path) -> tuple[int, int] | None:
    """(height, width) of the upright image from its header alone, or None if it cannot be parsed.

    Used only to group files into batches; `read_image` decides what is readable.
    """
    try:
        with open_regular(path) as f, Image.open(f) as im:  # never a FIFO: open() would block
            w, h = im.size
            orientation = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - any failure means "decode it alone and let read_image report"
        return None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)  # EXIF 5-8 rotate by 90 degrees


def resize_short_side(image: np.ndarray, short: int | None) -> np.ndarray:
    """Resize so the shorter side is ``short`` pixels (area when shrinking, cubic when enlarging)."""
    if not short:
        return image
    h, w = image.shape[:2]
    new_h, new_w = resized_shape(h, w, short)
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if short < min(h, w) else cv2.INTER_CUBIC)


def resized_shape(h: int, w: int, short: int | None) -> tuple[int, int]:
    """(height, width) after `resize_short_side` (unchanged when ``short`` is None)."""
    if not short:
        return h, w
    s = short / min(h, w)
    return round(h * s), round(w * s)


def score_paths(
    paths: Sequence[str | Path],
    model: QualiCLIP,
    *,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    max_pixels: int | None = None,
    resize_short: int | None = None,
    progress=None,
    max_memory: int | None = None,
    max_pixels_option: str = "max_pixels",
) -> list[FileScore]:
    """Score image files in input order; an unreadable file gets an ``error``, never an exception.

    Files are grouped by header size over the whole list, then decoded and scored one batch at a
    time, so memory holds at most ``batch_size`` decoded images whatever the number of files.
    ``resize_short`` resizes the shorter side first (the SPAQ protocol); None = full resolution.
    A file that fails `image_problem` (too small; above ``max_memory`` bytes, None:
    `default_memory_budget`) gets an ``error`` too. ``max_pixels_option`` is the setting named
    in the "too_large" message of a file above ``max_pixels`` (``--max-pixels`` for the CLI).
    """
    files = [Path(p) for p in paths]
    dev = scoring_device(model, device)
    scorer = inference_copy(model).to(dev)
    precision_autocast(dev, precision)  # a bad option fails before any file is read
    check = _ImageCheck(scorer, memory_budget(max_memory, dev), resize_short, max_pixels, max_pixels_option)
    results: list[FileScore | None] = [None] * len(files)
    for chunk in plan_batches([probe_size(p) or (0, 0, i) for i, p in enumerate(files)], batch_size, 1 << 62):
        decoded: list[Any] = [check.decode(files[i]) for i in chunk]  # (pixels, (h, w)) or an error text
        ok = [k for k, d in enumerate(decoded) if isinstance(d, tuple)]
        if ok:
            scores = score_arrays(
                scorer,
                [decoded[k][0] for k in ok],
                batch_size=batch_size,
                device=dev,
                precision=precision,
                max_memory=check.max_memory,
            )
            for k, s in zip(ok, scores):
                h, w = decoded[k][1]
                results[chunk[k]] = FileScore(files[chunk[k]], float(s), w, h)
        for k, d in enumerate(decoded):
            if isinstance(d, str):
                results[chunk[k]] = FileScore(files[chunk[k]], None, None, None, d)
        if progress is not None:
            progress.update(len(chunk))
    return results  # type: ignore[return-value]  # every index is filled: each file is in one chunk


@dataclass(frozen=True)
class _ImageCheck:
    """Decode one file for `score_paths` and check it fits the scorer before it is resized."""

    scorer: QualiCLIP
    max_memory: int
    resize_short: int | None
    max_pixels: int | None
    max_pixels_option: str

    def decode(self, path: Path) -> tuple[np.ndarray, tuple[int, int]] | str:
        """``(pixels, (h, w))`` with pixels resized if asked, or the error text ``"reason: detail"``."""
        try:
            pixels = read_image(
                path, max_pixels=self.max_pixels or DEFAULT_MAX_PIXELS, option=self.max_pixels_option
            ).pixels
        except ImageReadError as exc:
            return f"{exc.reason}: {exc.detail}"
        h, w = pixels.shape[:2]
        if problem := image_problem(self.scorer, resized_shape(h, w, self.resize_short), self.max_memory):
            return problem  # checked before the resize, which could need the memory itself
        return resize_short_side(pixels, self.resize_short), (h, w)
