"""Blur group: Gaussian, lens (disk) and motion (line) blur, all through OpenCV filtering."""

from __future__ import annotations

import functools
import math

import numpy as np

from . import _ops


def gaussian_blur(image: np.ndarray, sigma: float, state: None) -> np.ndarray:
    """Gaussian blur of std ``sigma``, kernel 2*ceil(2*sigma)+1, replicate border."""
    return _ops.gaussian_blur(image, sigma)


@functools.cache
def disk_kernel(radius: float) -> np.ndarray:
    """Normalised disk of ``radius`` px with anti-aliased rim, like MATLAB ``fspecial('disk')``.

    Each kernel cell holds the fraction of its area inside the circle, estimated on a 16x16
    sub-pixel grid. Returns a read-only float32 (2*ceil(radius)+1)^2 array.
    """
    half, sub = math.ceil(radius), 16
    offsets = (np.arange(sub) + 0.5) / sub - 0.5  # sub-pixel centres in a cell
    coords = (np.arange(-half, half + 1)[:, None] + offsets[None, :]).ravel()  # (K*sub,)
    inside = (coords[:, None] ** 2 + coords[None, :] ** 2) <= radius**2  # (K*sub, K*sub)
    k = 2 * half + 1
    cover = inside.reshape(k, sub, k, sub).mean(axis=(1, 3))
    kernel = (cover / cover.sum()).astype(np.float32)
    _ops.readonly(kernel)
    return kernel


def lens_blur(image: np.ndarray, radius: float, state: None) -> np.ndarray:
    """Convolution with a disk of ``radius`` px (defocus), replicate border."""
    return _ops.filter2d(image, disk_kernel(radius))


def motion_kernel(length: float, angle_deg: float) -> np.ndarray:
    """Normalised line kernel: a segment of ``length`` px at ``angle_deg``, bilinearly splatted.

    The segment is sampled densely and every sample spreads onto its 4 neighbouring cells with
    bilinear weights, so the kernel is anti-aliased and continuous in length and angle. Unlike
    MATLAB's ``fspecial('motion', 1, a)`` (a 1x1 identity) a length of 1 px is a slight blur,
    so level 1 is never the identity. Angle 0 is horizontal; positive angles turn
    counter-clockwise on screen.
    """
    half = math.ceil(length / 2) + 1
    n = max(64, int(32 * length))
    t = (np.arange(n) + 0.5) / n * length - length / 2  # (n,) positions on the line
    theta = math.radians(angle_deg)
    xs, ys = half + t * math.cos(theta), half - t * math.sin(theta)  # row index grows downwards
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    fx, fy = xs - x0, ys - y0
    k = 2 * half + 1
    kernel = np.zeros(k * k)
    for dy, dx, w in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        kernel += np.bincount((y0 + dy) * k + (x0 + dx), weights=w, minlength=k * k)
    return (kernel / kernel.sum()).reshape(k, k).astype(np.float32)


def draw_angle(rng: np.random.Generator, height: int, width: int) -> float:
    """A uniform blur direction in [0, 180) degrees, shared by all levels of one crop."""
    return float(rng.uniform(0.0, 180.0))


def motion_blur(image: np.ndarray, length: float, angle: float) -> np.ndarray:
    """Convolution with a line of ``length`` px at the drawn ``angle``, replicate border."""
    return _ops.filter2d(image, motion_kernel(length, angle))
