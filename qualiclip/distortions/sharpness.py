"""Sharpness and contrast group: unsharp masking and linear / non-linear contrast changes."""

from __future__ import annotations

import functools

import numpy as np
from scipy.interpolate import CubicSpline

from . import _ops

SHARPEN_SIGMA, SHARPEN_KSIZE = 6.0, 13  # the reference's kernel: 13x13 (radius 6) at sigma 6


def high_sharpen(image: np.ndarray, amount: float, state: None) -> np.ndarray:
    """Unsharp mask on Lab lightness: L + amount * (L - gaussian(L)), back to RGB."""
    lab = _ops.rgb_to_lab(image)
    lightness = np.ascontiguousarray(lab[..., 0])
    blurred = _ops.gaussian_blur(lightness, SHARPEN_SIGMA, ksize=SHARPEN_KSIZE)
    lab[..., 0] = lightness + np.float32(amount) * (lightness - blurred)
    return _ops.lab_to_rgb(lab)


@functools.lru_cache(maxsize=1)
def _contrast_shape() -> CubicSpline:
    """The unit contrast bump g: not-a-knot cubic spline (MATLAB ``spline``) through
    (0, 0), (0.3, -1), (0.5, 0), (0.7, 1), (1, 0)."""
    return CubicSpline([0.0, 0.3, 0.5, 0.7, 1.0], [0.0, -1.0, 0.0, 1.0, 0.0], bc_type="not-a-knot")


def draw_sign(rng: np.random.Generator, height: int, width: int) -> float:
    """+1 (more contrast) or -1 (less contrast), one per crop, kept across levels."""
    return 1.0 if rng.random() < 0.5 else -1.0


def linear_contrast_change(image: np.ndarray, amount: float, sign: float) -> np.ndarray:
    """Monotone variant of the reference's 5-point spline contrast curve.

    The curve goes through (0, 0), (0.3, 0.3 - sign*amount), (0.5, 0.5), (0.7, 0.7 + sign*amount),
    (1, 1). A spline reproduces straight lines, so it equals x + sign*amount*g(x): its distance
    from the identity is proportional to ``amount``. The reference's parameter a is this curve with
    sign*amount = (a + 0.2) / 4.
    """
    bump = _contrast_shape()(image).astype(np.float32)
    return image + np.float32(sign * amount) * bump


def non_linear_contrast_change(image: np.ndarray, offset: float, state: None) -> np.ndarray:
    """Compress [0, 1] linearly into [0.5 - offset, 0.5 + offset]."""
    return np.float32(0.5) + np.float32(2.0 * offset) * (image - np.float32(0.5))
