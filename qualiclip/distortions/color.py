"""Colour group: colour diffusion, colour shift, desaturation and oversaturation.

Colour spaces go through OpenCV (``_ops``); Lab round-trips are rounded to uint8 codes as in
the reference, which truncated instead.
"""

from __future__ import annotations

import math

import numpy as np

from . import _ops


def color_diffusion(image: np.ndarray, amount: float, state: None) -> np.ndarray:
    """Blur Lab a/b with sigma = 1.5*amount + 2, then scale them by ``amount``."""
    lab = _ops.rgb_to_lab(image)
    ab = _ops.gaussian_blur(np.ascontiguousarray(lab[..., 1:]), 1.5 * amount + 2.0)
    lab[..., 1:] = ab * np.float32(amount)
    return _ops.quantize8(_ops.lab_to_rgb(lab))


def color_saturation1(image: np.ndarray, factor: float, state: None) -> np.ndarray:
    """Scale HSV saturation by ``factor`` (< 1: desaturate; < 0 pushes past grey)."""
    hsv = _ops.rgb_to_hsv(image)
    hsv[..., 1] *= np.float32(factor)
    return _ops.hsv_to_rgb(hsv)


def color_saturation2(image: np.ndarray, factor: float, state: None) -> np.ndarray:
    """Scale Lab a/b by ``factor`` (> 1: oversaturate)."""
    lab = _ops.rgb_to_lab(image)
    lab[..., 1:] *= np.float32(factor)
    return _ops.quantize8(_ops.lab_to_rgb(lab))


def draw_direction(rng: np.random.Generator, height: int, width: int) -> float:
    """A uniform shift direction in [0, 2*pi) radians, shared by all levels of one crop."""
    return float(rng.uniform(0.0, 2.0 * math.pi))


_DIFF_X = np.array([[-0.5, 0.0, 0.5]], np.float32)
_DIFF_Y = np.ascontiguousarray(_DIFF_X.T)


def edge_weight(image: np.ndarray) -> np.ndarray:
    """Blurred gradient magnitude of the grey image, min-max normalised, then clipped at its
    own 1st and 99th percentiles (the step the reference meant but got wrong). (H, W) float32."""
    grey = _ops.rgb_to_grey(image)
    gx = _ops.filter2d(grey, _DIFF_X)  # central differences, like the reference's kornia 'diff'
    gy = _ops.filter2d(grey, _DIFF_Y)
    e = _ops.gaussian_blur(np.sqrt(gx * gx + gy * gy), 4.0)
    lo, hi = float(e.min()), float(e.max())
    if lo < hi:
        e = (e - lo) / np.float32(hi - lo)
    p1, p99 = np.percentile(e, (1.0, 99.0))
    return np.clip(e, p1, p99)


def color_shift(image: np.ndarray, amount: float, direction: float) -> np.ndarray:
    """Shift the green channel by ``amount`` px towards ``direction`` (replicate border),
    blended with the original green where the edge map is strong."""
    h, w = image.shape[:2]
    dy = int(round(amount * math.sin(direction)))
    dx = int(round(amount * math.cos(direction)))
    rows = np.clip(np.arange(h) - dy, 0, h - 1)
    cols = np.clip(np.arange(w) - dx, 0, w - 1)
    green = image[..., 1]
    shifted = green[rows][:, cols]
    e = edge_weight(image)
    out = image.copy()
    out[..., 1] = shifted * e + green * (1.0 - e)
    return out
