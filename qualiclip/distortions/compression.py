"""Compression group: JPEG (libjpeg through Pillow) and JPEG 2000 (OpenJPEG through Pillow)."""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, features

from . import _ops


def _roundtrip(image: np.ndarray, **save_args) -> np.ndarray:
    """Encode ``image`` (rounded to uint8) with Pillow and decode it back to float32 RGB."""
    buffer = io.BytesIO()
    Image.fromarray(_ops.to_uint8(image), "RGB").save(buffer, **save_args)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return _ops.from_uint8(np.asarray(decoded.convert("RGB")))


def jpeg(image: np.ndarray, quality: int, state: None) -> np.ndarray:
    """JPEG at ``quality`` (libjpeg, Pillow's default 4:2:0 chroma subsampling)."""
    return _roundtrip(image, format="JPEG", quality=int(quality))


def jpeg2000(image: np.ndarray, ratio: float, state: None) -> np.ndarray:
    """JPEG 2000 at compression ``ratio`` (one quality layer), as the reference encodes it.

    The reference uses 8 wavelet resolutions and LRCP order; OpenJPEG refuses more
    resolutions than the smaller side allows, so small images get fewer.
    """
    if not features.check("jpg_2000"):
        raise RuntimeError("jpeg2000 needs Pillow built with OpenJPEG (PIL.features.check('jpg_2000') is False)")
    h, w = image.shape[:2]
    resolutions = max(1, min(8, int(math.log2(min(h, w))) + 1))
    return _roundtrip(image, format="JPEG2000", quality_mode="rates", quality_layers=[float(ratio)],
                      num_resolutions=resolutions, progression="LRCP")
