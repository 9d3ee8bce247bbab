"""QualiCLIP training samples: two overlapping crops × L levels of one composition (docs/method.md, "A training sample")."""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from .distortions import GROUPS, LEVELS, get_distortion, to_uint8
from .schema import SampleConfig as SampleConfig  # declared with the params schema


@dataclass
class Sample:
    """``crops``: uint8 (2, L', crop, crop, 3), L' = L (+1 with the pristine crop first)."""

    crops: np.ndarray
    meta: dict = field(default_factory=dict)


def make_sample(image: np.ndarray, cfg: SampleConfig, rng: np.random.Generator) -> Sample:
    """Draw crop positions and a composition, then render both crops at every level.

    ``image`` is uint8 (H, W, 3) RGB. All randomness comes from ``rng``, so a sample is a pure
    function of (image, cfg, rng state).
    """
    image, scale = ensure_size(image, cfg.crop + cfg.max_shift)
    boxes = overlapping_boxes(image.shape[:2], cfg.crop, cfg.max_shift, rng)
    composition = draw_composition(cfg, rng)
    crops = [render_levels(_cut(image, box), composition, rng, cfg.include_pristine) for box in boxes]
    meta = {
        "boxes": [list(map(int, b)) for b in boxes],
        "scale": scale,
        "composition": [d.name for d in composition],
        "levels": [0, *LEVELS] if cfg.include_pristine else list(LEVELS),
    }
    return Sample(np.stack(crops), meta)


def ensure_size(image: np.ndarray, min_side: int) -> tuple[np.ndarray, float]:
    """Upscale so the shorter side is at least ``min_side`` (images too small for two crops)."""
    h, w = image.shape[:2]
    if min(h, w) >= min_side:
        return image, 1.0
    s = min_side / min(h, w)
    size = (max(min_side, round(w * s)), max(min_side, round(h * s)))
    return cv2.resize(image, size, interpolation=cv2.INTER_CUBIC), s


def overlapping_boxes(hw: tuple[int, int], crop: int, max_shift: int, rng: np.random.Generator) -> list[tuple]:
    """Two (y, x, h, w) boxes; the second is the first shifted by at most ``max_shift`` per axis."""
    h, w = hw
    y0, x0 = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    dy = int(rng.integers(max(-max_shift, -y0), min(max_shift, h - crop - y0) + 1))
    dx = int(rng.integers(max(-max_shift, -x0), min(max_shift, w - crop - x0) + 1))
    return [(y0, x0, crop, crop), (y0 + dy, x0 + dx, crop, crop)]


def _cut(image: np.ndarray, box: tuple) -> np.ndarray:
    y, x, h, w = box
    return np.ascontiguousarray(image[y : y + h, x : x + w], dtype=np.float32) / 255.0


def draw_composition(cfg: SampleConfig, rng: np.random.Generator) -> list:
    """``n ~ U{1..max_distortions}`` groups without replacement, one type uniformly inside each."""
    allowed = set(cfg.distortions) if cfg.distortions else None
    groups = {g: [t for t in types if allowed is None or t in allowed] for g, types in GROUPS.items()}
    groups = {g: t for g, t in groups.items() if t}
    names = sorted(groups)
    n = int(rng.integers(1, min(cfg.max_distortions, len(names)) + 1))
    chosen = [names[i] for i in rng.permutation(len(names))[:n]]
    return [get_distortion(groups[g][int(rng.integers(len(groups[g])))]) for g in chosen]


def render_levels(crop: np.ndarray, composition: list, rng: np.random.Generator, pristine: bool) -> np.ndarray:
    """uint8 (L', h, w, 3): the composition at every level, each type's random parts drawn once.

    Each level goes to uint8 as soon as it is rendered, into one preallocated array: the same
    bytes as converting the stack of float levels, without the float stack and its clipped copy
    (3 MB each for a 224² crop at 5 levels: ~3 ms of page faults and copies per crop).
    """
    h, w = crop.shape[:2]
    states = [d.draw(rng, h, w) for d in composition]
    out = np.empty((len(LEVELS) + int(pristine), h, w, 3), np.uint8)
    if pristine:
        out[0] = to_uint8(crop)
    for i, level in enumerate(LEVELS, start=int(pristine)):
        x = crop
        for d, state in zip(composition, states):
            x = d.apply(x, level, state)
        out[i] = to_uint8(x)
    return out
