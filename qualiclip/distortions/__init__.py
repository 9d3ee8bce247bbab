"""The degradation model: 24 distortion types in 7 groups, each at 5 levels (METHOD.md section 6).

    d = get_distortion("gaussian_blur")
    state = d.draw(rng, h, w)              # the random parts, once per crop
    levels = [d.apply(img, l, state) for l in range(1, 6)]
"""
from .registry import (
    GROUPS,
    N_LEVELS,
    Distortion,
    UnknownDistortionError,
    get_distortion,
    list_distortions,
)

__all__ = [
    "GROUPS",
    "N_LEVELS",
    "Distortion",
    "UnknownDistortionError",
    "contact_sheet",
    "get_distortion",
    "list_distortions",
    "save_contact_sheet",
]


def __getattr__(name: str):
    # The contact sheet pulls in Pillow drawing; import it only when asked for.
    if name in ("contact_sheet", "save_contact_sheet"):
        from . import grid

        return getattr(grid, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
