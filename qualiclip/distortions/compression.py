"""Compression group: JPEG (libjpeg-turbo) and JPEG 2000 (OpenJPEG), encoded and decoded back.

JPEG goes through OpenCV both ways; JPEG 2000 is encoded by Pillow (OpenCV cannot set the
reference's resolutions and progression order) and decoded by OpenCV. Both libraries bundle the
same codecs with the same settings, and the decoded pixels are identical to a Pillow round trip
(tests/test_distortions.py checks every level); OpenCV's path skips PIL's image objects and
buffers (JPEG ~40 % less time per call, JPEG 2000 decoding ~0.4 ms less).
"""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
from PIL import Image, features

from . import _ops


def _decode(data) -> np.ndarray:
    """Encoded bytes (or a uint8 buffer) -> float32 RGB in [0, 1]."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise RuntimeError("a distortion's own encoded image does not decode")
    return _ops.from_uint8(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def jpeg(image: np.ndarray, quality: int, state: None) -> np.ndarray:
    """JPEG at ``quality`` (libjpeg-turbo, 4:2:0 chroma subsampling, baseline)."""
    bgr = cv2.cvtColor(_ops.to_uint8(image), cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for an image of shape {image.shape}")
    return _decode(buffer)


def jpeg2000(image: np.ndarray, ratio: float, state: None) -> np.ndarray:
    """JPEG 2000 at compression ``ratio`` (one quality layer), as the reference encodes it.

    The reference uses 8 wavelet resolutions and LRCP order; OpenJPEG refuses more
    resolutions than the smaller side allows, so small images get fewer.
    """
    if not features.check("jpg_2000"):
        raise RuntimeError("jpeg2000 needs Pillow built with OpenJPEG (PIL.features.check('jpg_2000') is False)")
    h, w = image.shape[:2]
    resolutions = max(1, min(8, int(math.log2(min(h, w))) + 1))
    buffer = io.BytesIO()
    Image.fromarray(_ops.to_uint8(image), "RGB").save(
        buffer,
        format="JPEG2000",
        quality_mode="rates",
        quality_layers=[float(ratio)],
        num_resolutions=resolutions,
        progression="LRCP",
    )
    return _decode(buffer.getbuffer())
