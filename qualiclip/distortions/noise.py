"""Noise group: additive Gaussian (RGB and YCbCr), impulse and multiplicative noise.

Each crop draws its random field once (``draw_*``); a level only scales or thresholds it, so
the noise pattern is the same at every level and only its strength grows.

The draws read the generator's raw 64-bit words (``BitGenerator.random_raw``) and shape them
with numpy passes, instead of one call per value of numpy's samplers: a Gaussian field of a
224×224 crop is one table lookup per value (`normal_table`), about a fifth of the CPU of
``Generator.standard_normal`` (docs/distortions.md, "Noise draws from raw bits", shard format 4).
"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

from . import _ops

NORMAL_BITS = 16  # a Gaussian value is one of 2**16 equiprobable quantiles, indexed by 16 random bits


@functools.cache
def normal_table() -> np.ndarray:
    """The 65,536 values a drawn standard-normal value takes, equiprobable, float32, read-only.

    Entry i is the normal quantile at (i + 0.5) / 65536 (|z| <= 4.32), scaled so the table's
    variance is exactly 1 (the quantiles alone give 0.99998). Built from the positive half and
    mirrored, so the table is exactly symmetric and its mean exactly 0.
    """
    n = 1 << NORMAL_BITS
    inv = NormalDist().inv_cdf
    half = np.array([inv((i + 0.5) / n) for i in range(n // 2, n)])
    half /= math.sqrt(float(np.mean(half * half)))
    table = np.concatenate([-half[::-1], half]).astype(np.float32)
    _ops.readonly(table)
    return table


def raw_words(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` raw 64-bit words of ``rng``'s bit generator, little-endian whatever the machine."""
    return np.asarray(rng.bit_generator.random_raw(count), dtype="<u8")


def draw_normal(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A read-only standard-normal field (H, W, 3) float32: `normal_table` indexed by 16 random bits per value."""
    n = height * width * 3
    index = raw_words(rng, -(-n // 4)).view("<u2")[:n]  # four values per word, low bits first
    field = np.take(normal_table(), index).reshape(height, width, 3)
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

    index: np.ndarray  # type: ignore[assignment]  # (K,) int64, increasing; shadows tuple.index, never called here
    u: np.ndarray  # (K,) float32
    salt: np.ndarray  # (K,) float32


def draw_impulse(rng: np.random.Generator, height: int, width: int, max_density: float) -> ImpulseState:
    """Draw only the elements that any level can hit (about ``max_density`` of them).

    Equivalent in distribution to a uniform u per element of the image (an element is a
    candidate with probability max_density, and a candidate's u is uniform below it), at a
    thirtieth of the draws: one raw word per candidate (`bernoulli_positions`) gives the gap to
    it (top 39 bits), its salt/pepper bit (bit 24) and its u (low 24 bits).
    """
    index, word = bernoulli_positions(rng, height * width * 3, max_density)
    u = (word & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(max_density / (1 << 24))  # [0, max)
    salt = ((word >> np.uint64(24)) & np.uint64(1)).astype(np.float32)
    _ops.readonly(index, u, salt)
    return ImpulseState(index, u, salt)


def bernoulli_positions(
    rng: np.random.Generator, n: int, p: float, batch: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The sorted positions in [0, n) that independent trials of probability ``p`` pick (int64),
    and the raw word that placed each one; the word's low 25 bits are free for the caller.

    The gaps between picks are geometric, 1 + floor(log(U) / log(1 - p)) with U uniform from
    the word's top 39 bits, so the work grows with the n·p picks rather than with n (a
    Binomial(n, p) count of distinct positions from ``Generator.choice`` costs ~1.4× more).
    ``batch``: words read at a time (default: enough to pass n but once in a billion calls).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"bernoulli_positions: p must be in (0, 1), got {p!r}")
    scale = 1.0 / math.log1p(-p)  # P(gap > g) = (1 - p)**g
    mean = n * p
    batch = batch or int(mean + 6.0 * math.sqrt(mean)) + 16
    positions, words, last = [], [], -1
    while True:
        word = raw_words(rng, batch)
        uniform = ((word >> np.uint64(25)).astype(np.float64) + 0.5) * 2.0**-39  # in (0, 1)
        at = np.cumsum(np.floor(np.log(uniform) * scale).astype(np.int64) + 1) + last
        if at[-1] < n:  # every pick is inside: draw further
            positions.append(at)
            words.append(word)
            last = int(at[-1])
            continue
        inside = int(np.searchsorted(at, n))
        positions.append(at[:inside])
        words.append(word[:inside])
        if len(positions) == 1:
            return positions[0], words[0]
        return np.concatenate(positions), np.concatenate(words)


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
