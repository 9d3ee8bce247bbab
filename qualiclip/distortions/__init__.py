"""The degradation model: 24 distortion types in 7 groups, each at 5 levels (docs/method.md, "The degradation model").

d = get_distortion("gaussian_blur")
state = d.draw(rng, h, w)              # the random parts, once per crop
levels = [d.apply(img, l, state) for l in LEVELS]   # LEVELS = (1, 2, 3, 4, 5)
to_uint8(levels[0])                    # [0, 1] float -> uint8, rounded
"""

from ..schema import DistortionName, UnknownDistortionError
from ._ops import to_uint8
from .grid import contact_sheet, save_contact_sheet
from .registry import GROUPS, LEVELS, N_LEVELS, Distortion, get_distortion, list_distortions

__all__ = [
    "GROUPS",
    "LEVELS",
    "N_LEVELS",
    "Distortion",
    "DistortionName",
    "UnknownDistortionError",
    "contact_sheet",
    "get_distortion",
    "list_distortions",
    "save_contact_sheet",
    "to_uint8",
]
