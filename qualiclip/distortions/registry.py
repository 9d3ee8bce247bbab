"""The registry of the 24 distortion types: names, groups, level values and implementations.

This table is the one home of the degradation model's parameters (docs/method.md, "The degradation model", with
the project's monotone variants marked). ``docs/distortions.md`` explains every choice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..schema import DISTORTION_NAMES, unknown_name
from . import _ops, blur, brightness, color, compression, noise, sharpness, spatial

N_LEVELS = 5  # the degradation model's intensity levels: the one home of this number
LEVELS: tuple[int, ...] = tuple(range(1, N_LEVELS + 1))  # level numbers, 1 = least degraded

ApplyFn = Callable[[np.ndarray, Any, Any], np.ndarray]
DrawFn = Callable[[np.random.Generator, int, int], Any]


@dataclass(frozen=True)
class Distortion:
    """One distortion type at its 5 levels.

    ``levels`` holds the parameter of levels 1..5 (for signed monotone variants, the
    magnitude; the sign is drawn per crop). All randomness lives in the state returned by
    ``draw``; ``apply`` is a pure function of (image, level, state).
    """

    name: str
    group: str
    levels: tuple
    _apply: ApplyFn = field(repr=False, compare=False)
    _draw: DrawFn | None = field(default=None, repr=False, compare=False)
    _in_range: bool = field(default=False, repr=False, compare=False)  # _apply's output is already in [0, 1]

    def draw(self, rng: np.random.Generator, height: int, width: int) -> object:
        """Draw the random parts for one (height, width) crop, reusable for all 5 levels.

        A pure function of the generator's state; returns None for deterministic types.
        Arrays in the state are read-only.
        """
        return None if self._draw is None else self._draw(rng, int(height), int(width))

    def apply(self, image: np.ndarray, level: int, state: object) -> np.ndarray:
        """Distort ``image`` (float32 (H, W, 3) RGB in [0, 1]) at ``level`` in 1..5.

        Returns a new float32 C-contiguous (H, W, 3) array clipped to [0, 1]; never writes into
        ``image`` or ``state``.
        """
        _check_image(image, self.name)
        if not (isinstance(level, (int, np.integer)) and 1 <= level <= N_LEVELS):
            raise ValueError(f"{self.name}: level must be an int in 1..{N_LEVELS}, got {level!r}")
        out = self._apply(image, self.levels[level - 1], state)
        out = np.asarray(out, dtype=np.float32)
        if np.may_share_memory(out, image) or not out.flags.c_contiguous:
            out = np.ascontiguousarray(out).copy()
        assert out.shape == image.shape, (self.name, out.shape, image.shape)
        return out if self._in_range else _ops.clip_unit(out)


def _check_image(image: np.ndarray, name: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.float32 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name}: expected a float32 (H, W, 3) RGB array in [0, 1], got {got}")


IMPULSE_DENSITIES = (0.001, 0.005, 0.01, 0.02, 0.03)  # impulse_noise draws only what its strongest level hits

# (name, group, level values 1..5, apply, draw). Table order = the reference table's order (docs/method.md).
# "variant" marks values or kernels that depart from the reference table; docs/distortions.md says why.
_TABLE: tuple[tuple[str, str, tuple, ApplyFn, DrawFn | None], ...] = (
    (
        "gaussian_blur",
        "blur",
        (0.4, 0.5, 1.0, 2.0, 5.0),
        blur.gaussian_blur,
        None,
    ),  # variant: sigma 0.1 is the identity
    ("lens_blur", "blur", (1, 2, 4, 6, 8), blur.lens_blur, None),
    ("motion_blur", "blur", (1, 2, 4, 6, 10), blur.motion_blur, blur.draw_angle),  # variant: anti-aliased line kernel
    ("color_diffusion", "color", (1, 3, 6, 8, 12), color.color_diffusion, None),
    ("color_shift", "color", (1, 3, 6, 8, 12), color.color_shift, color.draw_direction),
    ("color_saturation1", "color", (0.4, 0.2, 0.1, 0.0, -0.4), color.color_saturation1, None),
    ("color_saturation2", "color", (1.5, 2.0, 3.0, 6.0, 9.0), color.color_saturation2, None),  # variant: no x1
    ("jpeg2000", "compression", (16, 32, 45, 120, 170), compression.jpeg2000, None),
    ("jpeg", "compression", (43, 36, 24, 7, 4), compression.jpeg, None),
    ("white_noise", "noise", (0.001, 0.002, 0.003, 0.005, 0.01), noise.white_noise, noise.draw_normal),
    ("white_noise_cc", "noise", (1e-4, 5e-4, 1e-3, 2e-3, 3e-3), noise.white_noise_cc, noise.draw_normal),
    (
        "impulse_noise",
        "noise",
        IMPULSE_DENSITIES,
        noise.impulse_noise,
        functools.partial(noise.draw_impulse, max_density=max(IMPULSE_DENSITIES)),
    ),
    ("multiplicative_noise", "noise", (0.001, 0.005, 0.01, 0.02, 0.05), noise.multiplicative_noise, noise.draw_normal),
    ("brighten", "brightness", (0.1, 0.2, 0.4, 0.7, 1.1), brightness.brighten, None),
    ("darken", "brightness", (0.05, 0.1, 0.2, 0.4, 0.8), brightness.darken, None),
    (
        "mean_shift",
        "brightness",
        (0.03, 0.06, 0.09, 0.12, 0.15),
        brightness.mean_shift,
        brightness.draw_sign,
    ),  # variant
    ("jitter", "spatial", (0.05, 0.1, 0.2, 0.5, 1.0), spatial.jitter, spatial.draw_jitter),
    ("non_eccentricity_patch", "spatial", (20, 40, 60, 80, 100), spatial.non_eccentricity_patch, spatial.draw_patches),
    ("pixelate", "spatial", (0.01, 0.05, 0.1, 0.2, 0.5), spatial.pixelate, None),
    ("quantization", "spatial", (20, 16, 13, 10, 7), spatial.quantization, None),  # variant: no min-max stretch
    ("color_block", "spatial", (2, 4, 6, 8, 10), spatial.color_block, spatial.draw_blocks),
    ("high_sharpen", "sharpness_contrast", (1, 2, 3, 6, 12), sharpness.high_sharpen, None),
    (
        "linear_contrast_change",
        "sharpness_contrast",
        (0.05, 0.07, 0.09, 0.11, 0.13),  # variant
        sharpness.linear_contrast_change,
        sharpness.draw_sign,
    ),
    (
        "non_linear_contrast_change",
        "sharpness_contrast",
        (0.4, 0.3, 0.2, 0.1, 0.05),
        sharpness.non_linear_contrast_change,
        None,
    ),
)

# Types whose apply only moves or replaces pixels of a clipped copy of its input (drawn values lie
# in [0, 1]): their output is in range already, and the final clip, a third of their tiny cost, is skipped.
_IN_RANGE = frozenset({"impulse_noise", "color_block", "non_eccentricity_patch", "pixelate"})

GROUP_ORDER = ("blur", "color", "compression", "noise", "brightness", "spatial", "sharpness_contrast")

_REGISTRY: dict[str, Distortion] = {
    name: Distortion(name, group, tuple(levels), apply, draw, name in _IN_RANGE)
    for name, group, levels, apply, draw in _TABLE
}
if tuple(_REGISTRY) != DISTORTION_NAMES:  # the params schema checks names against its own copy
    raise ImportError(f"qualiclip.schema.DISTORTION_NAMES differs from the registry's table: {tuple(_REGISTRY)}")

GROUPS: dict[str, tuple[str, ...]] = {g: tuple(d.name for d in _REGISTRY.values() if d.group == g) for g in GROUP_ORDER}


def list_distortions(group: str | None = None) -> list[str]:
    """Distortion names in table order, all of them or those of one ``group``."""
    if group is None:
        return [name for names in GROUPS.values() for name in names]
    if group not in GROUPS:
        raise unknown_name("distortion group", group, list(GROUPS))
    return list(GROUPS[group])


def get_distortion(name: str) -> Distortion:
    """The registered distortion called ``name``; UnknownDistortionError with a close match if none."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise unknown_name("distortion", name, list(_REGISTRY)) from None
