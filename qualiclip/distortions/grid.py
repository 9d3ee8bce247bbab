"""A contact sheet for humans: one row per distortion type, columns pristine + levels 1..5."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ._ops import to_uint8
from .registry import LEVELS, N_LEVELS, get_distortion, list_distortions

GAP, LABEL_WIDTH, HEADER_HEIGHT, FONT_SIZE = 4, 215, 24, 14


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _centre_crop(image: np.ndarray, crop: int) -> np.ndarray:
    """A central ``crop`` x ``crop`` square, upscaling (bicubic) an image that is too small."""
    h, w = image.shape[:2]
    if min(h, w) < crop:
        scale = crop / min(h, w)
        size = (max(crop, round(w * scale)), max(crop, round(h * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
        h, w = image.shape[:2]
    y, x = (h - crop) // 2, (w - crop) // 2
    return image[y : y + crop, x : x + crop]


def _row(pristine: np.ndarray, name: str, seed: int) -> list[np.ndarray]:
    """Pristine + the 5 levels of ``name`` as uint8 tiles. The row's generator depends only
    on (seed, type), so a type looks the same whichever other rows are on the sheet."""
    d = get_distortion(name)
    rng = np.random.default_rng([seed, list_distortions().index(name)])
    x = pristine.astype(np.float32) / 255.0
    state = d.draw(rng, *x.shape[:2])
    return [pristine] + [to_uint8(d.apply(x, lvl, state)) for lvl in LEVELS]


def contact_sheet(image: np.ndarray, names: list[str] | None = None, crop: int = 128, seed: int = 0) -> np.ndarray:
    """Render the sheet from a uint8 (H, W, 3) RGB ``image``: one labelled row per type in
    ``names`` (default: all, table order), columns pristine then levels 1..5. Returns uint8 RGB."""
    names = list_distortions() if names is None else list(names)
    pristine = np.ascontiguousarray(_centre_crop(np.asarray(image, dtype=np.uint8)[..., :3], crop))
    cols = N_LEVELS + 1
    width = LABEL_WIDTH + cols * (crop + GAP)
    height = HEADER_HEIGHT + len(names) * (crop + GAP)
    sheet = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(sheet), _font(FONT_SIZE)
    for c, title in enumerate(["pristine"] + [f"level {lvl}" for lvl in range(1, cols)]):
        draw.text(
            (LABEL_WIDTH + c * (crop + GAP) + crop // 2, HEADER_HEIGHT // 2),
            title,
            fill="black",
            font=font,
            anchor="mm",
        )
    for r, name in enumerate(names):
        top = HEADER_HEIGHT + r * (crop + GAP)
        draw.text((8, top + crop // 2), f"{name}\n({get_distortion(name).group})", fill="black", font=font, anchor="lm")
        for c, tile in enumerate(_row(pristine, name, seed)):
            sheet.paste(Image.fromarray(tile), (LABEL_WIDTH + c * (crop + GAP), top))
    return np.asarray(sheet)


def save_contact_sheet(
    image: str | Path | np.ndarray, out_png: str | Path, names: list[str] | None = None, crop: int = 128, seed: int = 0
) -> Path:
    """Read ``image`` (a path or a uint8 RGB array), render the sheet, write it as PNG; return the path."""
    if not isinstance(image, np.ndarray):
        with Image.open(image) as im:
            image = np.asarray(im.convert("RGB"))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(contact_sheet(image, names=names, crop=crop, seed=seed)).save(out)
    return out
