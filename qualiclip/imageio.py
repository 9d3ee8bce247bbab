"""Safe image reading shared by ingestion and scoring.

`read_image` turns any photo a camera or a web scrape produces into an 8-bit RGB array
``(H, W, 3) uint8`` with the EXIF orientation applied, or raises `ImageReadError` with a
machine-readable ``reason``. It never trusts the file: the pixel count declared in the
header is checked before any pixel is decoded (decompression-bomb guard), truncated data is
an error (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set), and only a fixed set of raster
formats is parsed, whatever the extension says (no EPS/Ghostscript, no PSD).

`iter_image_files` / `scan_tree` list candidate files in a deterministic order and
`resolve_inside` rejects paths and symlinks that escape their root.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import QualiclipError

# Pillow plugins allowed to parse a file (the JPEG plugin also opens MPO, the multi-picture
# JPEG of phones, whose format then reads "MPO"). Anything else, e.g. EPS (Ghostscript) or
# PSD, is "not_an_image" whatever its extension.
SAFE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default, made explicit
WHITE = (255, 255, 255)

# Every reason `read_image` can give; ingestion adds its own on top.
READ_REASONS: tuple[str, ...] = (
    "zero_bytes", "not_an_image", "truncated", "too_large", "unsupported_mode", "unreadable",
)
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"BM", "BMP"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"GIF8", "GIF"),
)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Pillow's MAX_IMAGE_PIXELS is process-global; it is lifted only for the header parse of one
# file at a time (our own check follows at once), so hold this lock while it is lifted.
_PIL_LIMIT_LOCK = threading.Lock()


class ImageReadError(QualiclipError):
    """A file that cannot become an RGB image; ``reason`` is one of `READ_REASONS`."""

    def __init__(self, reason: str, detail: str, path: str | Path | None = None):
        self.reason, self.detail, self.path = reason, detail, path
        where = f"{path}: " if path is not None else ""
        super().__init__(f"{where}{reason} — {detail}")


class PathOutsideRootError(QualiclipError, ValueError):
    """A path (usually a symlink) that resolves outside the folder it was found in."""

    def __init__(self, root: Path, path: Path, target: Path):
        self.root, self.path, self.target = root, path, target
        super().__init__(
            f"{path} resolves to {target}, outside the source root {root} — "
            "copy the file into the source folder instead of linking to it"
        )


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """Pixels ``(H, W, 3) uint8`` RGB, upright, plus what the file originally was."""

    pixels: np.ndarray = field(repr=False)
    format: str       # Pillow's format name (JPEG, PNG, ...), from the content, not the name
    mode: str         # the original Pillow mode (RGB, CMYK, P, I;16, ...)
    orientation: int  # EXIF orientation tag that was applied (1 = none)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def read_image(
    path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, background: Sequence[int] = WHITE
) -> DecodedImage:
    """Read ``path`` as upright 8-bit RGB; raise `ImageReadError` for anything else."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageReadError("unreadable", f"cannot read the file: {exc.strerror or exc}", path) from None
    return decode_image(data, max_pixels=max_pixels, background=background, name=path)


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, background: Sequence[int] = WHITE,
    name: str | Path | None = None,
) -> DecodedImage:
    """Decode encoded bytes; the same contract as `read_image`."""
    if not data:
        raise ImageReadError("zero_bytes", "the file is empty (0 bytes)", name)
    im = _open_checked(data, max_pixels, name)
    try:
        im.load()
        orientation = int(im.getexif().get(0x0112, 1) or 1)
        upright = ImageOps.exif_transpose(im) if orientation != 1 else im  # skip a full copy
    except Exception as exc:  # decoders raise OSError, ValueError, SyntaxError, zlib.error, ...
        raise _decode_error(exc, data, im.format, name) from None
    pixels = to_rgb(upright, background, name=name)
    return DecodedImage(pixels, im.format or "unknown", im.mode, orientation)


def _open_checked(data: bytes, max_pixels: int, name: str | Path | None) -> Image.Image:
    """Parse the header only and enforce ``max_pixels`` before anything is decoded."""
    Image.init()  # register every plugin once, so `formats=` can name WEBP and TIFF
    try:
        with _pil_limit_lifted():
            im = Image.open(io.BytesIO(data), formats=SAFE_FORMATS)
    except UnidentifiedImageError:
        raise _unidentified(data, name) from None
    except Image.DecompressionBombError as exc:  # only if another thread restored the limit
        raise ImageReadError("too_large", str(exc), name) from None
    except Exception as exc:
        raise _decode_error(exc, data, None, name) from None
    width, height = im.size
    if width * height > max_pixels:
        raise ImageReadError(
            "too_large",
            f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} "
            "(decompression-bomb guard) — raise ingest.max_pixels if the image is genuine",
            name,
        )
    if width < 1 or height < 1:
        raise ImageReadError("unreadable", f"header declares an empty size {width}x{height}", name)
    return im


@contextlib.contextmanager
def _pil_limit_lifted() -> Iterator[None]:
    """Lift Pillow's global pixel limit while one header is parsed; restore it after.

    Our own, configurable check runs right after `Image.open`; Pillow's global would otherwise
    refuse anything above 2 x its default even when the user raised ``max_pixels``.
    """
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _unidentified(data: bytes, name: str | Path | None) -> ImageReadError:
    kind = _sniff(data)
    if kind is None:
        head = data[:8]
        return ImageReadError(
            "not_an_image", f"not a {'/'.join(SAFE_FORMATS)} file (starts with {head!r})", name
        )
    return ImageReadError(
        "truncated" if len(data) < 1024 else "unreadable",
        f"starts like a {kind} file but its header cannot be parsed ({len(data)} bytes)",
        name,
    )


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for magic, kind in _SIGNATURES if data.startswith(magic)), None)


def _decode_error(exc: Exception, data: bytes, fmt: str | None, name: str | Path | None) -> ImageReadError:
    """Map a decoder exception to a reason; truncation is recognised by message or size."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower() or _riff_short(data):
        return ImageReadError("truncated", f"the image data ends early ({text})", name)
    return ImageReadError("unreadable", f"{fmt or _sniff(data) or 'image'} decoder failed ({text})", name)


def _riff_short(data: bytes) -> bool:
    """WebP (RIFF) files declare their length; libwebp reports truncation vaguely."""
    if _sniff(data) != "WEBP" or len(data) < 12:
        return False
    return len(data) < int.from_bytes(data[4:8], "little") + 8


def to_rgb(im: Image.Image, background: Sequence[int] = WHITE, *, name: str | Path | None = None) -> np.ndarray:
    """Any Pillow mode -> ``(H, W, 3) uint8`` RGB; alpha is composited over ``background``."""
    mode = im.mode
    if mode == "F":  # Pillow would clip floats to 0..255, turning a 0..1 image black
        raise ImageReadError(
            "unsupported_mode", "32-bit float image (mode 'F') has no defined range — save it as 8- or 16-bit", name
        )
    if mode in _SIXTEEN_BIT:
        grey = _sixteen_to_eight(im, name)
        return np.repeat(grey[:, :, None], 3, axis=2)
    try:
        if mode in _ALPHA_MODES or "transparency" in im.info:
            return _over_background(np.asarray(im.convert("RGBA")), background)
        if mode == "RGB":
            return np.asarray(im, dtype=np.uint8).copy()
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except ValueError as exc:  # "conversion from X to RGB not supported"
        raise ImageReadError("unsupported_mode", f"Pillow mode {mode!r} cannot become RGB ({exc})", name) from None


def _sixteen_to_eight(im: Image.Image, name: str | Path | None) -> np.ndarray:
    """16-bit grey -> 8-bit by scaling 0..65535 onto 0..255 (rounded), never by clipping.

    Mode ``I`` (int32) is taken as 16-bit data, which is what PNG/TIFF readers produce;
    values outside 0..65535 cannot be mapped without guessing and are refused.
    """
    values = np.asarray(im).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageReadError(
            "unsupported_mode",
            f"mode {im.mode!r} holds values {values.min()}..{values.max()}, expected 0..65535",
            name,
        )
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


def _over_background(rgba: np.ndarray, background: Sequence[int]) -> np.ndarray:
    """Integer alpha compositing (exact, platform-independent): ``(H, W, 4) -> (H, W, 3)``."""
    rgb = rgba[:, :, :3].astype(np.uint32)
    alpha = rgba[:, :, 3:].astype(np.uint32)
    bg = np.asarray(background, dtype=np.uint32).reshape(1, 1, 3)
    return ((rgb * alpha + bg * (255 - alpha) + 127) // 255).astype(np.uint8)


def pixel_hash(pixels: np.ndarray) -> str:
    """sha256 hex of an RGB array's shape and bytes: equal pixels <=> equal hash."""
    digest = hashlib.sha256(f"{pixels.shape}|{pixels.dtype}|".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- listing and path safety


@dataclass(frozen=True)
class TreeScan:
    """Files under a root, split by extension, plus directory symlinks that were not followed."""

    images: list[Path]      # extension in the list; sorted by relative POSIX path
    others: list[Path]      # any other file, same order
    dir_links: list[Path]   # symlinked directories (never descended into)


def scan_tree(root: str | Path, extensions: Sequence[str]) -> TreeScan:
    """Walk ``root`` recursively in a deterministic order, without following directory links.

    Directory symlinks are not descended into (no cycles, no double counting); they are
    returned so the caller can report those that escape ``root``. File symlinks are listed
    like files; check them with `resolve_inside`.
    """
    root = Path(root)
    wanted = {e.lower() for e in extensions}
    images, others, dir_links = [], [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dir_links += [here / d for d in dirnames if (here / d).is_symlink()]
        for fname in filenames:
            (images if Path(fname).suffix.lower() in wanted else others).append(here / fname)

    def order(p: Path) -> str:
        return p.relative_to(root).as_posix()

    return TreeScan(sorted(images, key=order), sorted(others, key=order), sorted(dir_links, key=order))


def iter_image_files(root: str | Path, extensions: Sequence[str]) -> list[Path]:
    """Files under ``root`` whose extension (case-insensitive) is in ``extensions``, sorted."""
    return scan_tree(root, extensions).images


def resolve_inside(root: str | Path, path: str | Path) -> Path:
    """The real path of ``path``; `PathOutsideRootError` if it leaves the real ``root``."""
    real_root = Path(root).resolve()
    candidate = Path(path) if Path(path).is_absolute() else Path(root) / path
    target = candidate.resolve()
    if not target.is_relative_to(real_root):
        raise PathOutsideRootError(real_root, Path(path), target)
    return target

