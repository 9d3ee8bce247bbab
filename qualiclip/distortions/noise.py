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
    """The elements that the strongest level hits, with what each decides.

    ``index``: distinct flat indices into the (H, W, 3) image; ``u``: uniform in
    [0, max density) per index, the element is hit at density d when u < d; ``salt``: 1.0 (salt)
    or 0.0 (pepper) per index.
    """

    index: np.ndarray  # type: ignore[assignment]  # (K,) int64; shadows tuple.index, never called here
    u: np.ndarray  # (K,) float32
    salt: np.ndarray  # (K,) float32


def draw_impulse(rng: np.random.Generator, height: int, width: int, max_density: float) -> ImpulseState:
    """Draw only the elements that any level can hit (about ``max_density`` of them).

    Equivalent in distribution to a uniform u per element of the image (an element is a
    candidate with probability max_density, and a candidate's u is uniform below it), at a
    thirtieth of the draws: K ~ Binomial(H*W*3, max_density) distinct positions, then u and the
    salt/pepper bit of each.
    """
    n = height * width * 3
    k = int(rng.binomial(n, max_density))
    index = rng.choice(n, size=k, replace=False, shuffle=False)
    u = rng.random(k, dtype=np.float32) * np.float32(max_density)
    salt = (rng.random(k, dtype=np.float32) < 0.5).astype(np.float32)
    _ops.readonly(index, u, salt)
    return ImpulseState(index, u, salt)


def impulse_noise(image: np.ndarray, density: float, state: ImpulseState) -> np.ndarray:
    """Salt and pepper per channel element with probability ``density``, half salt.

    An element is hit when its ``u < density``, so the hits of a level include those of every
    lower level (thresholding one draw), and a hit element has the same value at every level.
    """
    hit = state.u < density
    out = np.clip(image, 0.0, 1.0)  # the output is in range: Distortion.apply skips its clip
    out.reshape(-1)[state.index[hit]] = state.salt[hit]
    return out


def multiplicative_noise(image: np.ndarray, var: float, noise: np.ndarray) -> np.ndarray:
    """Speckle: y = x + x * n with n ~ N(0, var)."""
    return image * (1.0 + np.float32(np.sqrt(var)) * noise)
