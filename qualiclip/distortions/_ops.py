"""Shared building blocks of the distortions: kernels, colour spaces, uint8 round-trips.

Every function here is pure: it never writes into its arguments. Images are float32
(H, W, C) arrays; RGB values live in [0, 1].
"""

from __future__ import annotations

import math

import cv2
import numpy as np


def gaussian_ksize(sigma: float) -> int:
    """The reference kernel size for a Gaussian of std ``sigma``: 2*ceil(2*sigma) + 1."""
    return 2 * math.ceil(2 * sigma) + 1


def gaussian_blur(image: np.ndarray, sigma: float, ksize: int | None = None) -> np.ndarray:
    """Gaussian blur with replicate border; kernel 2*ceil(2*sigma)+1 unless ``ksize`` is given."""
    k = gaussian_ksize(sigma) if ksize is None else ksize
    return cv2.GaussianBlur(image, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)


def filter2d(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate every channel with ``kernel`` (odd-sized, float32), replicate border."""
    return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REPLICATE)


def clip_unit(image: np.ndarray) -> np.ndarray:
    """Clip a float32 array to [0, 1] in place and return it (NaN becomes 0).

    Two OpenCV thresholds: ~30 % faster than ``np.clip`` on a 224² crop, which matters for the
    distortions whose whole work is a copy and a few pixels (impulse noise, colour blocks).
    """
    flat = image.reshape(1, -1)  # any shape as one row
    cv2.threshold(flat, 1.0, 1.0, cv2.THRESH_TRUNC, dst=flat)
    cv2.threshold(flat, 0.0, 0.0, cv2.THRESH_TOZERO, dst=flat)
    return image


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float32 -> uint8, rounding to the nearest code, ties to even (the reference truncated).

    Bit-identical to ``np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)`` (tested) in two
    passes instead of four: OpenCV scales, rounds and saturates in one.
    """
    clipped = np.clip(image, 0.0, 1.0)
    return cv2.convertScaleAbs(clipped.reshape(1, -1), alpha=255.0).reshape(clipped.shape)  # any shape


def from_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1] (cast and scale in one pass)."""
    return np.multiply(image, np.float32(1.0 / 255.0), dtype=np.float32)


def quantize8(image: np.ndarray) -> np.ndarray:
    """Round a [0, 1] float image to the 256 uint8 codes, staying in float32."""
    return from_uint8(to_uint8(image))


# Colour spaces go through OpenCV (sRGB, D65; float32 in [0, 1]): L in [0, 100], a/b roughly
# [-127, 127]; HSV hue in degrees, S and V in [0, 1]; YCrCb full range with offset 0.5.
def rgb_to_lab(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2Lab)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(lab, cv2.COLOR_Lab2RGB)


def rgb_to_grey(image: np.ndarray) -> np.ndarray:
    """Rec. 601 luma (0.299 R + 0.587 G + 0.114 B), (H, W)."""
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2HSV)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def rgb_to_ycrcb(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2YCrCb)


def ycrcb_to_rgb(ycrcb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB)


def parabola_curve(x: np.ndarray, midpoint: float) -> np.ndarray:
    """The tone curve through (0, 0), (0.5, midpoint), (1, 1).

    The reference fits MATLAB's ``spline`` to these three points, which is exactly this
    parabola: y = x + 4*(midpoint - 0.5)*x*(1 - x). Not clipped.
    """
    c = np.float32(4.0 * (midpoint - 0.5))
    return x + c * x * (1.0 - x)


def readonly(*arrays: np.ndarray) -> None:
    """Mark drawn random fields read-only, so that no ``apply`` can mutate a state."""
    for a in arrays:
        a.flags.writeable = False
