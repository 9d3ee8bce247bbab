"""Match labels to image files and check the pairing both ways.

Problems found: a label whose image is missing, a label listed twice, an image that PIL cannot
open, and an image file in a rated folder that no label names. With ``on_missing='error'`` any
problem raises DatasetError naming the first few offenders and the counts; with ``'exclude'``
the offending labels are dropped and every problem is returned as the report.
"""

from __future__ import annotations

import collections
import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from qualiclip.datasets.base import DatasetError, IQAItem, Labels, Spec

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
SHOW_OFFENDERS = 5
MISSING, DUPLICATE, UNREADABLE, UNLABELLED = (
    "missing image",
    "duplicate label",
    "unreadable image",
    "image without a label",
)


class FolderIndex:
    """Cached folder listings that resolve a label's file name to the file on disk.

    A name resolves to, in order: the exact file; the one file whose name matches ignoring case
    (TID2013 mixes ``i25``/``I25``); the one image file with the same stem and another image
    suffix (CLIVE's ``.bmp`` labels next to lossless ``.png`` re-encodes). Anything else is None.
    """

    def __init__(self):
        self._listings: dict[Path, list[str]] = {}
        self._keys: dict[Path, tuple[set[str], dict[str, list[str]], dict[str, list[str]]]] = {}

    def images(self, folder: Path) -> list[str]:
        """Names of the image files directly inside ``folder`` (not recursive), sorted."""
        if folder not in self._listings:
            try:
                with os.scandir(folder) as it:
                    names = [e.name for e in it if e.is_file() and _is_image(e.name)]
            except (FileNotFoundError, NotADirectoryError):
                names = []
            self._listings[folder] = sorted(names)
        return self._listings[folder]

    def resolve(self, path: Path) -> Path | None:
        exact, by_lower, by_stem = self._lookup(path.parent)
        if path.name in exact:
            return path
        for table, key in ((by_lower, path.name.lower()), (by_stem, _stem(path.name))):
            hits = table.get(key, [])
            if len(hits) == 1:
                return path.with_name(hits[0])
        return None

    def _lookup(self, folder: Path):
        if folder not in self._keys:  # hashed once per folder: 10k labels stay O(N)
            names = self.images(folder)
            by_lower: dict[str, list[str]] = collections.defaultdict(list)
            by_stem: dict[str, list[str]] = collections.defaultdict(list)
            for n in names:
                by_lower[n.lower()].append(n)
                by_stem[_stem(n)].append(n)
            self._keys[folder] = (set(names), by_lower, by_stem)
        return self._keys[folder]


def build_items(labels: Labels, spec: Spec) -> tuple[list[IQAItem], list[tuple[Path, str]]]:
    """Resolve every label to a readable image; return the good items and all problems found."""
    index = FolderIndex()
    items, problems, seen = [], [], set[Path]()  # seen: every labelled file found, good or not
    for row in labels.rows:
        wanted = labels.image_dir / row.name
        path = index.resolve(wanted)
        problem = _problem(path, seen)
        if path is not None:
            seen.add(path)
        if problem:
            problems.append((path or wanted, problem))
            continue
        assert path is not None  # no problem: the file was found
        items.append(IQAItem(path, _higher_is_better(row.raw_mos, spec), row.split, row.raw_mos))
    known = seen | {p for n in labels.ignore if (p := index.resolve(labels.image_dir / n))}
    folders = {(labels.image_dir / row.name).parent for row in labels.rows}
    problems += [(f / n, UNLABELLED) for f in sorted(folders) for n in index.images(f) if f / n not in known]
    return items, problems


def raise_or_report(name: str, root: Path, problems: list[tuple[Path, str]], on_missing: str) -> None:
    """Raise DatasetError summarising ``problems`` unless ``on_missing == 'exclude'``."""
    if not problems or on_missing == "exclude":
        return
    counts = collections.Counter(reason.split(" (")[0] for _, reason in problems)
    summary = ", ".join(f"{reason}: {n}" for reason, n in counts.most_common())
    first = "; ".join(f"{path} ({reason})" for path, reason in problems[:SHOW_OFFENDERS])
    raise DatasetError(
        f"dataset '{name}' at {root}: {len(problems)} problem(s) [{summary}]; first: {first} — "
        "fix the files, or pass on_missing='exclude' to drop them and read dataset.report"
    )


def warn_out_of_range(name: str, items: list[IQAItem], spec: Spec) -> None:
    """Warn (not fail) when released scores fall outside the declared range: the range is
    documentation of the scale, and a wrong one points at the wrong dataset or option."""
    lo, hi = spec.mos_range
    outside = [i for i in items if i.raw_mos is not None and not lo <= i.raw_mos <= hi]
    if outside:
        warnings.warn(
            f"dataset '{name}': {len(outside)} score(s) outside the declared mos_range "
            f"{spec.mos_range}, e.g. {outside[0].raw_mos} for {outside[0].path}",
            stacklevel=3,
        )


def _problem(path: Path | None, seen: set[Path]) -> str | None:
    if path is None:
        return MISSING
    if path in seen:
        return DUPLICATE
    return _unreadable_reason(path)


def _unreadable_reason(path: Path) -> str | None:
    # Header parse + verify(): catches non-images and (for PNG) broken chunks without decoding
    # pixels, so validating a 10k-image set stays a matter of seconds.
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"{UNREADABLE} ({type(exc).__name__}: {exc})"
    return None


def _higher_is_better(raw: float, spec: Spec) -> float:
    lo, hi = spec.mos_range
    return lo + hi - raw if spec.lower_is_better else raw


def _stem(name: str) -> str:
    return os.path.splitext(name)[0].lower()


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
