"""Noise group: additive Gaussian (RGB and YCbCr), impulse and multiplicative noise.

Each crop draws its random field once (``draw_*``); a level only scales or thresholds it, so
the noise pattern is the same at every level and only its strength grows.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _ops


def draw_normal(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A read-only standard-normal field (H, W, 3) float32."""
    field = rng.standard_normal((height, width, 3), dtype=np.float32)
    _ops.readonly(field)
    return field


def white_noise(image: np.ndarray, var: float, noise: np.ndarray) -> np.ndarray:
    """Additive Gaussian noise of variance ``var`` on each RGB channel."""
    return image + np.float32(np.sqrt(var)) * noise


def white_noise_cc(image: np.ndarray, var: float, noise: np.ndarray) -> np.ndarray:
    """Additive Gaussian noise of variance ``var`` on each channel of full-range YCbCr."""
    ycc = _ops.rgb_to_ycrcb(image)
    ycc += np.float32(np.sqrt(var)) * noise
    return _ops.ycrcb_to_rgb(ycc)


class ImpulseState(NamedTuple):
    """``u`` uniform [0,1) per element decides which elements flip; ``salt`` says to 1 or to 0."""

    u: np.ndarray     # (H, W, 3) float32
    salt: np.ndarray  # (H, W, 3) bool


def draw_impulse(rng: np.random.Generator, height: int, width: int) -> ImpulseState:
    u = rng.random((height, width, 3), dtype=np.float32)
    salt = rng.random((height, width, 3), dtype=np.float32) < 0.5
    _ops.readonly(u, salt)
    return ImpulseState(u, salt)


def impulse_noise(image: np.ndarray, density: float, state: ImpulseState) -> np.ndarray:
    """Salt and pepper per channel element with probability ``density``, half salt.

    An element is hit when ``u < density``, so the hits of a level include those of every
    lower level (thresholding one field), and a hit element has the same value at every level.
    """
    hit = state.u < density
    return np.where(hit, state.salt.astype(np.float32), image)


def multiplicative_noise(image: np.ndarray, var: float, noise: np.ndarray) -> np.ndarray:
    """Speckle: y = x + x * n with n ~ N(0, var)."""
    return image * (1.0 + np.float32(np.sqrt(var)) * noise)
