"""Spatial group: jitter, non-eccentricity patches, pixelation, quantisation, colour blocks.

Patch and block types draw positions for the largest count once per crop; level n uses the
first n of them, so every level contains the alterations of the levels below it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import cv2
import numpy as np

from . import _ops

JITTER_ITERATIONS = 5
PATCH_SIZE, PATCH_MARGIN, PATCH_SPREAD, MAX_PATCHES = 16, 16, 16, 100
BLOCK_SIZE, MAX_BLOCKS, BLOCK_CANDIDATES = 32, 10, 50


@functools.lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinate maps (x, y), each (H, W) float32, read-only."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    _ops.readonly(xs, ys)
    return xs, ys


def draw_jitter(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Standard-normal displacements (iterations, 2 = (dy, dx), H, W) float32, read-only."""
    field = rng.standard_normal((JITTER_ITERATIONS, 2, height, width), dtype=np.float32)
    _ops.readonly(field)
    return field


def jitter(image: np.ndarray, sigma: float, field: np.ndarray) -> np.ndarray:
    """Move every pixel by a random N(0, sigma^2) offset per axis, ``JITTER_ITERATIONS`` times,
    with bilinear interpolation and replicate border (OpenCV remap, 1/32 px resolution)."""
    h, w = image.shape[:2]
    xs, ys = _grid(h, w)
    s = np.float32(sigma)
    out = image
    for dy, dx in field:
        out = cv2.remap(out, xs - s * dx, ys - s * dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out


class PatchState(NamedTuple):
    """Top-left corners (MAX_PATCHES, 2) int of the copied patches and of their destinations."""

    src: np.ndarray
    dst: np.ndarray


def draw_patches(rng: np.random.Generator, height: int, width: int) -> PatchState:
    """Sources as in the reference (a margin of 16 px, where the crop allows it) and
    destinations within +-8 px of them, clipped to stay inside the crop."""
    size = np.array([height, width])
    lo = np.minimum(PATCH_MARGIN, np.maximum(size - PATCH_SIZE, 0))
    span = np.maximum(size - PATCH_SIZE - PATCH_MARGIN - lo, 0)
    src = np.rint(rng.random((MAX_PATCHES, 2)) * span).astype(np.int64) + lo
    offset = (rng.random((MAX_PATCHES, 2)) - 0.5) * PATCH_SPREAD
    dst = np.clip(np.rint(src + offset).astype(np.int64), 0, np.maximum(size - PATCH_SIZE, 0))
    _ops.readonly(src, dst)
    return PatchState(src, dst)


def non_eccentricity_patch(image: np.ndarray, count: int, state: PatchState) -> np.ndarray:
    """Copy ``count`` 16x16 patches to nearby positions, one after another (a later copy may
    read an earlier one's result, as in the reference)."""
    out = np.clip(image, 0.0, 1.0)  # the output is in range: Distortion.apply skips its clip
    p = PATCH_SIZE
    for (sy, sx), (ty, tx) in zip(state.src[:count], state.dst[:count]):
        out[ty : ty + p, tx : tx + p] = out[sy : sy + p, sx : sx + p].copy()
    return out


def pixelate(image: np.ndarray, strength: float, state: None) -> np.ndarray:
    """Nearest-neighbour down-scale by 0.95 - strength^0.6, then nearest up-scale back."""
    h, w = image.shape[:2]
    z = 0.95 - strength**0.6
    small = cv2.resize(image, (max(1, int(w * z)), max(1, int(h * z))), interpolation=cv2.INTER_NEAREST)
    small = np.clip(small, 0.0, 1.0)  # the output is in range: Distortion.apply skips its clip
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def quantization(image: np.ndarray, n_levels: int, state: None) -> np.ndarray:
    """Uniform quantisation of each channel to ``n_levels`` values 0, 1/(n-1), ..., 1."""
    step = np.float32(n_levels - 1)
    return np.rint(image * step) / step


class BlockState(NamedTuple):
    """Top-left corners (MAX_BLOCKS, 2) int and RGB colours (MAX_BLOCKS, 3) float32."""

    corners: np.ndarray
    colours: np.ndarray


def draw_blocks(rng: np.random.Generator, height: int, width: int) -> BlockState:
    """Corners for MAX_BLOCKS squares that do not overlap where the crop leaves room.

    Candidates are drawn uniformly (as in the reference) and kept greedily when they overlap no
    kept square. Without overlaps every extra square covers pristine pixels, so the damage grows
    strictly with the count; the reference let a later square cover an earlier one.
    """
    span = np.maximum(np.array([height, width]) - BLOCK_SIZE, 0)
    candidates = np.floor(rng.random((MAX_BLOCKS * BLOCK_CANDIDATES, 2)) * span).astype(np.int64)
    kept: list[int] = []
    points = candidates.tolist()  # plain ints: this loop runs in microseconds, not per-element numpy calls
    for i, (y, x) in enumerate(points):
        if all(abs(y - points[j][0]) >= BLOCK_SIZE or abs(x - points[j][1]) >= BLOCK_SIZE for j in kept):
            kept.append(i)
            if len(kept) == MAX_BLOCKS:
                break
    if len(kept) < MAX_BLOCKS:  # crowded crop: fill up with the first rejected, overlaps allowed
        taken = set(kept)
        kept += [i for i in range(len(points)) if i not in taken][: MAX_BLOCKS - len(kept)]
    corners = candidates[kept]
    colours = rng.random((MAX_BLOCKS, 3), dtype=np.float32)
    _ops.readonly(corners, colours)
    return BlockState(corners, colours)


def color_block(image: np.ndarray, count: int, state: BlockState) -> np.ndarray:
    """Paste the first ``count`` uniformly coloured 32x32 squares of the state."""
    out = np.clip(image, 0.0, 1.0)  # colours are in [0, 1): Distortion.apply skips its clip
    b = BLOCK_SIZE
    for (y, x), colour in zip(state.corners[:count], state.colours[:count]):
        out[y : y + b, x : x + b] = colour
    return out
