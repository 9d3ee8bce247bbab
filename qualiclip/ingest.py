"""The ``ingest`` stage: pristine photos in, normalised lossless RGB copies and a manifest out.

Every candidate file is decoded (`qualiclip.imageio.read_image`: EXIF orientation, 8-bit RGB,
decompression-bomb guard), checked against a minimum size and deduplicated by pixel content.
Bad input never stops the run and is never dropped silently: each rejected file gets a row in
``rejected.csv`` with its reason. The stage fails (`IngestError`) only when nothing usable is
left. Rules, output layout and the reasons table: docs/ingest.md.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Annotated, NamedTuple, TypeVar

import cv2
import numpy as np
import skimage.data
from annotated_types import Interval, Len, MinLen, Predicate, doc
from PIL import Image
from tqdm import tqdm

from qualiclip import identity
from qualiclip.config import ConfigError, check_fields
from qualiclip.errors import QualiclipError
from qualiclip.imageio import (
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_LIMIT,
    READ_REASONS,
    ImageReadError,
    PathOutsideRootError,
    check_path_text,
    decode_image,
    read_image_bytes,
    resolve_inside,
    scan_tree,
)
from qualiclip.schema import MAX_SIDE, MAX_WORKERS

log = logging.getLogger(__name__)

SKIMAGE_SOURCE = "skimage"
# The photographs inside the scikit-image wheel whose docstrings (skimage.data.<function>)
# state that they may be redistributed. moon.png and motorcycle_left.png also ship there but
# their docstrings state no licence, so they are left out.
SKIMAGE_IMAGES: dict[str, str] = {
    "astronaut.png": "public domain (NASA Great Images)",
    "brick.png": "CC0 (CC0Textures)",
    "camera.png": "CC0 (photographer Lav Varshney)",
    "chelsea.png": "CC0 (photographer Stefan van der Walt)",
    "coffee.png": "CC0 (photographer Rachel Michetti)",
    "coins.png": "no known copyright restrictions (Brooklyn Museum)",
    "grass.png": "CC0 (CC0Textures)",
    "gravel.png": "CC0 (CC0Textures)",
    "hubble_deep_field.jpg": "public domain (NASA)",
    "ihc.png": "no known copyright restrictions (CMMI)",
    "retina.jpg": "CC0 1.0 (Wikimedia Commons / Häggström)",
    "rocket.jpg": "public domain (SpaceX)",
}
INGEST_REASONS: tuple[str, ...] = (
    "too_small",
    "duplicate",
    "symlink_outside_root",
    "unsupported_extension",
)
REJECT_REASONS: tuple[str, ...] = READ_REASONS + INGEST_REASONS
MANIFEST_FILE, IMAGES_DIR = "manifest.csv", "images"  # the output: manifest.csv + images/<id>.png
MANIFEST_COLUMNS = ("id", "split", "source", "path", "format", "mode", "width", "height", "bytes", "sha256")
REJECTED_COLUMNS = ("source", "path", "reason", "detail")
PNG_COMPRESS_LEVEL = 1  # 3x faster than 6 for ~10% more bytes, measured on the skimage photos


class IngestError(QualiclipError, RuntimeError):
    """The stage cannot produce any usable image, or its sources/output are unusable."""


def _is_extension(name: str) -> bool:
    return len(name) > 1 and name.startswith(".")


Extension = Annotated[str, Predicate(_is_extension), doc("an extension with a leading dot, e.g. '.jpg'")]


@dataclass(frozen=True)
class IngestConfig:
    """The ``ingest`` section of params.yaml."""

    # folders (recursive) or "skimage"
    sources: Annotated[tuple[Annotated[str, MinLen(1), Predicate(check_path_text)], ...], MinLen(1)] = (SKIMAGE_SOURCE,)
    extensions: Annotated[tuple[Extension, ...], MinLen(1)] = (
        ".jpg",
        ".jpeg",
        ".png",
        ".webp",
        ".tif",
        ".tiff",
        ".bmp",
    )
    min_size: Annotated[int, Interval(ge=1, le=MAX_SIDE)] = 224  # shorter side, pixels
    max_pixels: Annotated[int, Interval(ge=1, le=MAX_PIXELS_LIMIT)] = (
        DEFAULT_MAX_PIXELS  # decompression-bomb guard, checked before decoding
    )
    # alpha is composited over this
    background: Annotated[tuple[Annotated[int, Interval(ge=0, le=255)], ...], Len(3, 3)] = (255, 255, 255)
    val_fraction: Annotated[float, Interval(ge=0, lt=1)] = 0.25
    workers: Annotated[int, Interval(ge=1, le=MAX_WORKERS)] = 2  # decode threads; outputs do not depend on it

    def __post_init__(self) -> None:
        check_fields(self, "ingest")


@dataclass(frozen=True)
class IngestResult:
    out_dir: Path
    manifest: Path
    rejected: Path
    summary: Path
    n_accepted: int
    n_train: int
    n_val: int
    n_rejected: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)


class Candidate(NamedTuple):
    source: str  # the source as written in params.yaml
    root: Path
    rel: str  # POSIX path relative to root; the manifest's "path"


class Rejection(NamedTuple):
    source: str
    path: str
    reason: str
    detail: str


class Accepted(NamedTuple):
    cand: Candidate
    id: str
    png: bytes
    row: dict[str, object]  # manifest row without "split"


# ------------------------------------------------------------------------------- listing


def list_candidates(cfg: IngestConfig) -> tuple[list[Candidate], list[Rejection]]:
    """All candidate files in source order, then sorted path; plus rejections found while listing."""
    cands: list[Candidate] = []
    rejects: list[Rejection] = []
    for source in cfg.sources:
        if source == SKIMAGE_SOURCE:
            c, r = _skimage_candidates()
        else:
            c, r = _folder_candidates(source, cfg.extensions)
        cands += c
        rejects += r
    return cands, rejects


def skimage_root() -> Path:
    """The folder inside the installed scikit-image wheel that holds its sample photos."""
    return Path(skimage.data.__file__).parent


def _skimage_candidates() -> tuple[list[Candidate], list[Rejection]]:
    root = skimage_root()
    cands, rejects = [], []
    for name in sorted(SKIMAGE_IMAGES):
        if (root / name).is_file():
            cands.append(Candidate(SKIMAGE_SOURCE, root, name))
        else:
            rejects.append(
                Rejection(SKIMAGE_SOURCE, name, "unreadable", f"not in the installed scikit-image wheel ({root})")
            )
    return cands, rejects


def _folder_candidates(source: str, extensions: tuple[str, ...]) -> tuple[list[Candidate], list[Rejection]]:
    root = Path(source)
    if not root.is_dir():
        raise IngestError(
            f"ingest source {source!r} is not a folder (resolved: {root.resolve()}) — "
            f"fix ingest.sources in params.yaml, or use '{SKIMAGE_SOURCE}' for the embedded photos"
        )
    scan = scan_tree(root, extensions)
    cands = [Candidate(source, root, p.relative_to(root).as_posix()) for p in scan.images]
    rejects = [
        Rejection(
            source,
            p.relative_to(root).as_posix(),
            "unsupported_extension",
            f"extension {p.suffix or '(none)'!r} is not in ingest.extensions {list(extensions)}",
        )
        for p in scan.others
    ]
    for link in scan.dir_links:
        try:
            resolve_inside(root, link)  # a link inside the root: its files are reached directly
        except PathOutsideRootError as exc:
            rejects.append(
                Rejection(
                    source,
                    link.relative_to(root).as_posix(),
                    "symlink_outside_root",
                    f"directory link not followed: {exc}",
                )
            )
    rejects += [
        Rejection(
            source,
            folder.relative_to(root).as_posix(),
            "unreadable",
            f"{why} — the photos inside it are not ingested; fix its permissions",
        )
        for folder, why in scan.unlisted
    ]
    return cands, rejects


# ------------------------------------------------------------------------------ per file


def process_file(cand: Candidate, cfg: IngestConfig) -> Accepted | Rejection:
    """Read, check and encode one candidate. Thread-safe; never raises for bad input."""
    path = cand.root / cand.rel
    try:
        resolve_inside(cand.root, path)
        data = read_image_bytes(path, max_pixels=cfg.max_pixels, option="ingest.max_pixels")
        img = decode_image(data, max_pixels=cfg.max_pixels, background=cfg.background, option="ingest.max_pixels")
    except PathOutsideRootError as exc:
        return Rejection(cand.source, cand.rel, "symlink_outside_root", str(exc))
    except ImageReadError as exc:
        return Rejection(cand.source, cand.rel, exc.reason, exc.detail)
    if min(img.width, img.height) < cfg.min_size:
        return Rejection(
            cand.source,
            cand.rel,
            "too_small",
            f"{img.width}x{img.height}: shorter side {min(img.width, img.height)} < ingest.min_size={cfg.min_size}",
        )
    image_id = identity.image_id(img.pixels)
    row = {
        "id": image_id,
        "source": cand.source,
        "path": cand.rel,
        "format": img.format,
        "mode": img.mode,
        "width": img.width,
        "height": img.height,
        "bytes": len(data),
        "sha256": identity.photo_digest(data),
    }
    return Accepted(cand, image_id, _encode_png(img.pixels), row)


def _encode_png(pixels: np.ndarray) -> bytes:
    """Fixed settings and no metadata, so equal pixels give equal bytes (for one zlib build)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, in input order, with a bounded window.

    Pillow's decoders, zlib and hashlib release the GIL, so threads use both cores without
    pickling pixels between processes; the window keeps memory flat on 100k-file folders.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


# ------------------------------------------------------------------------- split, outputs


def split_of(image_id: str, val_fraction: float) -> str:
    """``val`` when the id, read as a fraction of 16**16, is below ``val_fraction``."""
    return "val" if int(image_id, 16) / 16**16 < val_fraction else "train"


def assign_splits(ids: list[str], val_fraction: float) -> dict[str, str]:
    """Split by content hash, so an image keeps its split when the corpus grows.

    Tiny sets: with ``val_fraction > 0`` and at least two images, each split gets at least
    one image — the lowest hash moves to ``val`` or the highest to ``train``.
    """
    splits = {i: split_of(i, val_fraction) for i in ids}
    if val_fraction > 0 and len(ids) >= 2:
        ordered = sorted(ids)  # hex ids of equal length sort like their fractions
        if "val" not in splits.values():
            splits[ordered[0]] = "val"
        if "train" not in splits.values():
            splits[ordered[-1]] = "train"
    return splits


def _collect(
    cands: list[Candidate], cfg: IngestConfig, images_dir: Path, progress: bool
) -> tuple[list[dict[str, object]], list[Rejection]]:
    """Process every candidate, keep the first of each pixel content, write its PNG."""
    rows: list[dict[str, object]] = []
    rejects: list[Rejection] = []
    first: dict[str, Candidate] = {}
    results = ordered_map(lambda c: process_file(c, cfg), cands, cfg.workers)
    for res in tqdm(results, total=len(cands), desc="ingest", unit="img", disable=None if progress else True):
        if isinstance(res, Rejection):
            rejects.append(res)
        elif res.id in first:
            rejects.append(
                Rejection(
                    res.cand.source,
                    res.cand.rel,
                    "duplicate",
                    f"duplicate of {res.id} ({_where(first[res.id], res.cand)})",
                )
            )
        else:
            first[res.id] = res.cand
            (images_dir / f"{res.id}.png").write_bytes(res.png)
            rows.append(res.row)
    return rows, rejects


def _where(orig: Candidate, dup: Candidate) -> str:
    return orig.rel if orig.source == dup.source else f"{orig.source}: {orig.rel}"


def _write_csv(path: Path, columns: tuple[str, ...], rows: Iterable[dict[str, object]]) -> None:
    # backslashreplace: a file name that is not valid UTF-8 must not crash the report
    with path.open("w", newline="", encoding="utf-8", errors="backslashreplace") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _summary(cfg: IngestConfig, n_cands: int, rows: list[dict], rejects: list[Rejection]) -> dict:
    counts = Counter(r.reason for r in rejects)
    return {
        "sources": list(cfg.sources),
        "n_candidates": n_cands,
        "n_accepted": len(rows),
        "n_train": sum(r["split"] == "train" for r in rows),
        "n_val": sum(r["split"] == "val" for r in rows),
        "n_rejected": len(rejects),
        "rejected": {reason: counts.get(reason, 0) for reason in REJECT_REASONS},
    }


# ---------------------------------------------------------------------------- the stage


def run_ingest(cfg: IngestConfig, out_dir: str | Path, *, progress: bool = True) -> IngestResult:
    """Ingest ``cfg.sources`` into ``out_dir`` (recreated), see docs/ingest.md.

    Raises `IngestError` for a missing source folder, an ``out_dir`` that overlaps a source or
    holds something other than a previous ingest output, and when no image is usable (the
    reports are still written, so ``rejected.csv`` says why). ``progress``: a progress bar on
    stderr when it is a terminal (none in logs and pipes).
    """
    out_dir = Path(out_dir)
    cands, rejects = list_candidates(cfg)
    _check_out_dir(out_dir, [c.root for c in cands])
    tmp = _fresh_dir(out_dir.with_name(f".{out_dir.name}.ingest-tmp"))
    (tmp / IMAGES_DIR).mkdir()
    rows, file_rejects = _collect(cands, cfg, tmp / IMAGES_DIR, progress)
    splits = assign_splits([str(r["id"]) for r in rows], cfg.val_fraction)
    rows = [{**r, "split": splits[str(r["id"])]} for r in rows]
    order = {s: i for i, s in enumerate(cfg.sources)}
    rejects = sorted(rejects + file_rejects, key=lambda r: (order[r.source], r.path))
    summary = _summary(cfg, len(cands), rows, rejects)
    _write_csv(tmp / MANIFEST_FILE, MANIFEST_COLUMNS, rows)
    _write_csv(tmp / "rejected.csv", REJECTED_COLUMNS, (r._asdict() for r in rejects))
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    _replace_dir(tmp, out_dir)
    log.info(
        "ingest: %d accepted (%d train, %d val), %d rejected %s",
        summary["n_accepted"],
        summary["n_train"],
        summary["n_val"],
        summary["n_rejected"],
        {k: v for k, v in summary["rejected"].items() if v},
    )
    if not rows:
        raise IngestError(
            f"no usable image in ingest sources {list(cfg.sources)} ({len(cands)} candidate files, "
            f"{len(rejects)} rejected) — see {out_dir / 'rejected.csv'} for each file's reason"
        )
    return IngestResult(
        out_dir,
        out_dir / MANIFEST_FILE,
        out_dir / "rejected.csv",
        out_dir / "summary.json",
        summary["n_accepted"],
        summary["n_train"],
        summary["n_val"],
        summary["n_rejected"],
        {k: v for k, v in summary["rejected"].items() if v},
    )


def _check_out_dir(out_dir: Path, roots: list[Path]) -> None:
    """Refuse an output folder that overlaps a source, or that we would wrongly delete."""
    real = out_dir.resolve()
    for root in {r.resolve() for r in roots}:
        if real.is_relative_to(root) or root.is_relative_to(real):
            raise IngestError(
                f"ingest output {out_dir} overlaps the source folder {root} — "
                "write the output outside every source folder"
            )
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "summary.json").is_file():
        raise IngestError(
            f"{out_dir} exists, is not empty and is not an ingest output (no summary.json); "
            "refusing to delete it — choose another output folder or empty it"
        )


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Swap the finished output into place, so a crash never leaves a half-written ``out_dir``."""
    if out_dir.is_symlink() or out_dir.is_file():
        out_dir.unlink()
    elif out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


# ------------------------------------------------------------------ reading the output


def read_manifest(ingest_dir: Path, split: str | None = None) -> list[dict]:
    """Rows of the ingest manifest (optionally one split), sorted by id."""
    path = Path(ingest_dir) / MANIFEST_FILE
    if not path.is_file():
        raise IngestError(f"no manifest at {path} — run the ingest stage first (`dvc repro ingest`)")
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if split is None or r["split"] == split]
    return sorted(rows, key=lambda r: r["id"])


def check_crop(ingest_dir: Path, rows: list[dict], crop: int, key: str) -> None:
    """Refuse a ``crop`` larger than the shorter side of an image of ``rows`` (manifest rows of
    ``ingest_dir``), from the manifest's sizes, before any image is read: such a crop would
    upscale photos into made-up pixels and, far too large, take minutes and gigabytes (``key``
    is the params key that set it, named in the `ConfigError`)."""
    manifest = Path(ingest_dir) / MANIFEST_FILE
    try:
        sides = sorted((min(int(r["width"]), int(r["height"])), r["id"]) for r in rows)
    except (KeyError, TypeError, ValueError):
        raise IngestError(f"{manifest} lacks the image sizes (width, height) — rerun the ingest stage") from None
    if sides and crop > sides[0][0]:
        side, image_id = sides[0]
        n = sum(s < crop for s, _ in sides)
        raise ConfigError(
            f"{key} is {crop} px, larger than the shorter side of {n} of the {len(rows)} images in {manifest} "
            f"(smallest: {side} px, {image_id}) — set {key} to at most {side}, or raise ingest.min_size "
            f"to {crop} to leave the smaller photos out"
        )


def images_dir(ingest_dir: Path) -> str:
    """The folder of the ingested images (a string: the key of `load_image`'s cache)."""
    return str(Path(ingest_dir) / IMAGES_DIR)


@lru_cache(maxsize=8)
def load_image(images_dir: str, image_id: str) -> np.ndarray:
    """An ingested image as uint8 (H, W, 3) RGB (cached: a shard holds every variant of an image)."""
    bgr = cv2.imread(str(Path(images_dir) / f"{image_id}.png"), cv2.IMREAD_COLOR)
    if bgr is None:
        raise IngestError(f"ingested image {image_id}.png is missing or corrupt in {images_dir} — rerun ingest")
    return np.ascontiguousarray(bgr[..., ::-1])
