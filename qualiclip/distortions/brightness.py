"""Brightness group: brighten, darken (tone curves) and the monotone mean shift."""

from __future__ import annotations

import numpy as np

from . import _ops


def brighten(image: np.ndarray, amount: float, state: None) -> np.ndarray:
    """Tone curve through (0.5, 0.5 + amount/2): 2/3 applied to RGB, 1/3 to Lab lightness.

    The Lab branch keeps hue and chroma while the RGB branch also brightens colours; mixing
    them is the reference's recipe (KADID-10k).
    """
    mid = 0.5 + amount / 2
    rgb = np.clip(_ops.parabola_curve(image, mid), 0.0, 1.0)
    lab = _ops.rgb_to_lab(image)
    lab[..., 0] = np.clip(_ops.parabola_curve(lab[..., 0] / 100.0, mid), 0.0, 1.0) * 100.0
    from_lab = np.clip(_ops.lab_to_rgb(lab), 0.0, 1.0)
    return (2.0 * rgb + from_lab) / 3.0


def darken(image: np.ndarray, amount: float, state: None) -> np.ndarray:
    """Tone curve through (0.5, 0.5 - amount/2) on RGB (the reference's default, no Lab mix)."""
    return _ops.parabola_curve(image, 0.5 - amount / 2)


def draw_sign(rng: np.random.Generator, height: int, width: int) -> float:
    """+1 or -1 with equal probability: one direction per crop, kept across levels."""
    return 1.0 if rng.random() < 0.5 else -1.0


def mean_shift(image: np.ndarray, amount: float, sign: float) -> np.ndarray:
    """Monotone variant: add ``sign * amount`` to every channel (``amount`` grows with level)."""
    return image + np.float32(sign * amount)
