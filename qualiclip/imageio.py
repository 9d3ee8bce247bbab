"""Safe image reading shared by ingestion and scoring.

`read_image` turns any photo a camera or a web scrape produces into an 8-bit RGB array
``(H, W, 3) uint8`` with the EXIF orientation applied, or raises `ImageReadError` with a
machine-readable ``reason``. It never trusts the file: the pixel count declared in the
header is checked before any pixel is decoded (decompression-bomb guard), truncated data is
an error (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set), and only a fixed set of raster
formats is parsed, whatever the extension says (no EPS/Ghostscript, no PSD).

Only regular files are ever opened (`qualiclip.files.open_regular`): a FIFO would block the
reader forever, a device may act on open. A file is read whole only after its header passed (a 512 MB file
of random bytes named ``.jpg`` costs one small read).

`iter_image_files` / `scan_tree` list candidate files in a deterministic order (and the
folders that cannot be listed) and `resolve_inside` rejects paths and symlinks that escape
their root. `check_path_text` is the one check of a string that becomes a path (a list file's
line, a served request's ``path``, a params value): no NUL byte, nothing the file system
cannot encode, no longer than the system allows; it raises `BadPathError`, which callers turn
into an error of that one item (``reason`` ``bad_name``).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import QualiclipError
from .files import FileReadError, open_regular, symlink_loop

# Pillow plugins allowed to parse a file (the JPEG plugin also opens MPO, the multi-picture
# JPEG of phones, whose format then reads "MPO"). Anything else, e.g. EPS (Ghostscript) or
# PSD, is "not_an_image" whatever its extension.
SAFE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default, made explicit
MAX_PIXELS_LIMIT = 1 << 31  # the highest max_pixels a user may set: such an image decodes to 6.4 GB of RGB
WHITE = (255, 255, 255)

# Every reason `read_image` can give; ingestion adds its own on top.
READ_REASONS: tuple[str, ...] = (
    "zero_bytes",
    "not_an_image",
    "truncated",
    "too_large",
    "unsupported_mode",
    "unreadable",
    "not_a_file",
    "symlink_loop",
    "bad_name",
)
# POSIX limits of a path and of one of its components, in bytes (Linux: 4096 and 255)
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"GIF8", "GIF"),
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


class BadPathError(ImageReadError, ValueError):
    """A string that cannot name a file (reason ``bad_name``): a NUL byte, an unencodable
    character, or too long. An `ImageReadError`, so every per-file error path reports it."""

    def __init__(self, detail: str, path: str | Path):
        super().__init__("bad_name", detail, shown_path(path))


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
    format: str  # Pillow's format name (JPEG, PNG, ...), from the content, not the name
    mode: str  # the original Pillow mode (RGB, CMYK, P, I;16, ...)
    orientation: int  # EXIF orientation tag that was applied (1 = none)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def read_image(
    path: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: Sequence[int] = WHITE,
    option: str = "max_pixels",
) -> DecodedImage:
    """Read ``path`` as upright 8-bit RGB; raise `ImageReadError` for anything else.

    ``option`` is the setting that raises ``max_pixels``, named in the "too_large" message
    (``ingest.max_pixels``, ``--max-pixels``, ...).
    """
    data = read_image_bytes(path, max_pixels=max_pixels, option=option)
    return decode_image(data, max_pixels=max_pixels, background=background, name=path, option=option)


def read_image_bytes(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, option: str = "max_pixels") -> bytes:
    """The bytes of the image file ``path``, read whole only once its header has passed.

    Checked first, from a few KB at most: a regular file (`qualiclip.files.open_regular`: no
    FIFO, device or socket is opened), not empty, one of `SAFE_FORMATS`, and at most
    ``max_pixels`` pixels declared. `ImageReadError` otherwise.
    """
    check_path_text(path)
    try:
        with open_regular(path) as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ImageReadError("zero_bytes", "the file is empty (0 bytes)", path)
            _open_checked(f, max_pixels, path, option)  # Pillow reads the header only (not closed: that closes f)
            f.seek(0)
            return f.read()
    except FileReadError as exc:
        raise ImageReadError(exc.reason, exc.detail, path) from None
    except OSError as exc:  # a read error after the open
        raise ImageReadError("unreadable", f"cannot read the file: {exc.strerror or exc}", path) from None


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: Sequence[int] = WHITE,
    name: str | Path | None = None,
    option: str = "max_pixels",
) -> DecodedImage:
    """Decode encoded bytes; the same contract as `read_image`."""
    if not data:
        raise ImageReadError("zero_bytes", "the file is empty (0 bytes)", name)
    im = _open_checked(io.BytesIO(data), max_pixels, name, option)
    try:
        im.load()
        orientation = int(im.getexif().get(0x0112, 1) or 1)
        upright = ImageOps.exif_transpose(im) if orientation != 1 else im  # skip a full copy
    except Exception as exc:  # decoders raise OSError, ValueError, SyntaxError, zlib.error, ...
        raise _decode_error(exc, data[:64], len(data), im.format, name) from None
    pixels = to_rgb(upright, background, name=name)
    return DecodedImage(pixels, im.format or "unknown", im.mode, orientation)


def _open_checked(fp: BinaryIO, max_pixels: int, name: str | Path | None, option: str) -> Image.Image:
    """Parse the header of the seekable file ``fp`` only; enforce ``max_pixels`` before anything is decoded."""
    Image.init()  # register every plugin once, so `formats=` can name WEBP and TIFF
    try:
        with _pil_limit_lifted():
            im = Image.open(fp, formats=SAFE_FORMATS)
    except UnidentifiedImageError:
        raise _unidentified(*_head_and_size(fp), name) from None
    except Image.DecompressionBombError as exc:  # only if another thread restored the limit
        raise ImageReadError("too_large", str(exc), name) from None
    except Exception as exc:
        raise _decode_error(exc, *_head_and_size(fp), None, name) from None
    width, height = im.size
    if width * height > max_pixels:
        raise ImageReadError(
            "too_large",
            f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} "
            f"(decompression-bomb guard) — raise {option} if the image is genuine",
            name,
        )
    if width < 1 or height < 1:
        raise ImageReadError("unreadable", f"header declares an empty size {width}x{height}", name)
    return im


def _head_and_size(fp: BinaryIO) -> tuple[bytes, int]:
    """The first bytes of ``fp`` (enough to sniff a format) and its length, for error messages."""
    size = fp.seek(0, os.SEEK_END)
    fp.seek(0)
    return fp.read(64), size


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


def _unidentified(head: bytes, size: int, name: str | Path | None) -> ImageReadError:
    kind = _sniff(head)
    if kind is None:
        return ImageReadError("not_an_image", f"not a {'/'.join(SAFE_FORMATS)} file (starts with {head[:8]!r})", name)
    return ImageReadError(
        "truncated" if size < 1024 else "unreadable",
        f"starts like a {kind} file but its header cannot be parsed ({size} bytes)",
        name,
    )


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for magic, kind in _SIGNATURES if data.startswith(magic)), None)


def _decode_error(exc: Exception, head: bytes, size: int, fmt: str | None, name: str | Path | None) -> ImageReadError:
    """Map a decoder exception to a reason; truncation is recognised by message or size.

    ``head`` is the start of the file (at least 12 bytes when it has them), ``size`` its length.
    """
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower() or _riff_short(head, size):
        return ImageReadError("truncated", f"the image data ends early ({text})", name)
    return ImageReadError("unreadable", f"{fmt or _sniff(head) or 'image'} decoder failed ({text})", name)


def _riff_short(head: bytes, size: int) -> bool:
    """WebP (RIFF) files declare their length; libwebp reports truncation vaguely."""
    if _sniff(head) != "WEBP" or size < 12:
        return False
    return size < int.from_bytes(head[4:8], "little") + 8


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


# ---------------------------------------------------------------- listing and path safety


@dataclass(frozen=True)
class TreeScan:
    """Files under a root, split by extension, plus directory symlinks that were not followed
    and folders that could not be listed (their files are unknown, so they must be reported)."""

    images: list[Path]  # extension in the list; sorted by relative POSIX path
    others: list[Path]  # any other file, same order
    dir_links: list[Path]  # symlinked directories (never descended into)
    unlisted: list[tuple[Path, str]] = field(default_factory=list)  # (folder, why), same order


def scan_tree(root: str | Path, extensions: Sequence[str]) -> TreeScan:
    """Walk ``root`` recursively in a deterministic order, without following directory links.

    Directory symlinks are not descended into (no cycles, no double counting); they are
    returned so the caller can report those that escape ``root``. File symlinks are listed
    like files; check them with `resolve_inside`. Anything that is not a folder is listed as a
    file (FIFOs too: `open_regular` refuses them when they are read). A folder that cannot be
    listed (no permission) is returned in ``unlisted`` with the reason.
    """
    root = Path(root)
    wanted = {e.lower() for e in extensions}
    images: list[Path] = []
    others: list[Path] = []
    dir_links, unlisted = [], []

    def unlistable(exc: OSError) -> None:
        unlisted.append((Path(exc.filename), f"folder cannot be listed: {exc.strerror or exc}"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=unlistable):
        here = Path(dirpath)
        dir_links += [here / d for d in dirnames if (here / d).is_symlink()]
        for fname in filenames:
            (images if Path(fname).suffix.lower() in wanted else others).append(here / fname)

    def order(p: Path) -> str:
        return p.relative_to(root).as_posix()

    return TreeScan(
        sorted(images, key=order),
        sorted(others, key=order),
        sorted(dir_links, key=order),
        sorted(unlisted, key=lambda u: order(u[0])),
    )


def iter_image_files(root: str | Path, extensions: Sequence[str]) -> list[Path]:
    """Files under ``root`` whose extension (case-insensitive) is in ``extensions``, sorted."""
    return scan_tree(root, extensions).images


def check_path_text(path: str | os.PathLike | bytes) -> str:
    """``path`` as a string the file system can take; `BadPathError` (``bad_name``) otherwise.

    The one check of a string that becomes a path, before any use: no NUL byte (the OS cuts the
    name there; Python refuses it with a ValueError), only characters the file system encoding
    can hold (the surrogate escapes of undecodable bytes are fine: they give those bytes back; a
    lone surrogate from JSON is not), at most `MAX_PATH_BYTES` in all and `MAX_NAME_BYTES` per
    component.
    """
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise BadPathError(f"a path must be text, got {type(path).__name__}", repr(path))
    text = os.fsdecode(path)
    if "\0" in text:
        raise BadPathError(
            f"the name holds a NUL byte at character {text.index(chr(0))} — no file can have "
            "that name (a list file is one path per line, not NUL-separated)",
            text,
        )
    try:
        raw = os.fsencode(text)
    except UnicodeError:
        bad = next(c for c in text if not _encodable(c))
        raise BadPathError(
            f"the name holds {_char_name(bad)}, which no file name can encode — fix the name", text
        ) from None
    if len(raw) > MAX_PATH_BYTES:
        raise BadPathError(f"the path is {len(raw)} bytes, longer than the {MAX_PATH_BYTES} a path may be", text)
    longest = max(raw.split(b"/"), key=len)
    if len(longest) > MAX_NAME_BYTES:
        raise BadPathError(
            f"a component of the path is {len(longest)} bytes, longer than the {MAX_NAME_BYTES} a file name may be",
            text,
        )
    return text


def _encodable(char: str) -> bool:
    try:
        os.fsencode(char)
    except UnicodeError:
        return False
    return True


def _char_name(char: str) -> str:
    return f"U+{ord(char):04X} (a lone surrogate)" if 0xD800 <= ord(char) <= 0xDFFF else f"{char!r} (U+{ord(char):04X})"


def shown_path(path: object) -> str:
    """A path as a message or an output row shows it: NUL and other control bytes escaped, so one
    bad name cannot cut or garble a line."""
    text = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or 0xDC80 <= ord(c) <= 0xDCFF else ascii(c)[1:-1] for c in text)


def resolve_inside(root: str | Path, path: str | Path) -> Path:
    """The real path of ``path``; `PathOutsideRootError` if it leaves the real ``root``,
    `BadPathError` if it is no valid name (`check_path_text`), `ImageReadError`
    (``symlink_loop``) if it is a symlink loop."""
    check_path_text(path)
    real_root = Path(root).resolve()
    candidate = Path(path) if Path(path).is_absolute() else Path(root) / path
    try:
        target = candidate.resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError("Symlink loop ..."), later ones OSError
        if isinstance(exc, OSError) and exc.errno != errno.ELOOP:
            raise
        loop = symlink_loop(path)
        raise ImageReadError(loop.reason, loop.detail, path) from None
    if not target.is_relative_to(real_root):
        raise PathOutsideRootError(real_root, Path(path), target)
    return target
