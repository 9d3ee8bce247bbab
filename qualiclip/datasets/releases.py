"""One loader per released IQA dataset, each reading the release's own label files.

Each loader takes the release root and keyword options and returns `Labels` (image names
relative to an image folder, raw scores, official split if any); `registry.load_dataset`
validates them against the files. Layouts and the assumptions made are in docs/datasets.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qualiclip.datasets.base import DatasetError, Labels, Row, Spec
from qualiclip.datasets.readers import read_columns, read_csv, read_mat_vector, read_split_file, read_xlsx, to_float
from qualiclip.datasets.registry import register
from qualiclip.datasets.validate import IMAGE_SUFFIXES

SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}

KONIQ_SCORES = "koniq10k_scores_and_distributions.csv"
KONIQ_SETS = "koniq10k_distributions_sets.csv"  # metadata/ of github.com/subpic/koniq
KONIQ_RESOLUTIONS = ("1024x768", "512x384")


@register("koniq10k", Spec((1.0, 5.0), lower_is_better=False))
def koniq10k(root: Path, *, resolution: str = "1024x768") -> Labels:
    """KonIQ-10k: ``MOS`` (1-5) of ``koniq10k_scores_and_distributions.csv``, images in
    ``<resolution>/``. Official train/val/test from a ``set`` column, or from
    ``koniq10k_distributions_sets.csv`` placed in the root (the release CSV has no ``set``)."""
    if resolution not in KONIQ_RESOLUTIONS:
        raise DatasetError(f"koniq10k resolution must be one of {KONIQ_RESOLUTIONS}, got {resolution!r}")
    table = read_csv(root / KONIQ_SCORES, ("image_name", "MOS"))
    sets = _koniq_sets(root, table)
    rows = [
        Row(r["image_name"], to_float(r["MOS"], f"{KONIQ_SCORES} {r['image_name']}"), sets.get(r["image_name"]))
        for r in table
    ]
    return Labels(rows, root / resolution)


def _koniq_sets(root: Path, table: list[dict[str, str]]) -> dict[str, str | None]:
    if table and "set" not in table[0] and (root / KONIQ_SETS).is_file():
        table = read_csv(root / KONIQ_SETS, ("image_name", "set"))
    return {r["image_name"]: split_name(r.get("set")) for r in table}


CLIVE_TRAINING = ("t1", "t2", "t3", "t4", "t5", "t6", "t7")


def clive_labels(data_dir: Path, *, include_training: bool = False) -> list[Row]:
    """CLIVE's labels from ``AllImages_release.mat`` + ``AllMOS_release.mat`` in ``data_dir``:
    1,169 entries whose first 7 (t1-t7) trained the raters and are dropped unless asked."""
    names = read_mat_vector(data_dir / "AllImages_release.mat", "AllImages_release")
    mos = read_mat_vector(data_dir / "AllMOS_release.mat", "AllMOS_release")
    if len(names) != len(mos):
        raise DatasetError(f"{data_dir}: {len(names)} image names but {len(mos)} MOS values")
    head = tuple(Path(str(n)).stem.lower() for n in names[: len(CLIVE_TRAINING)])
    if head != CLIVE_TRAINING:
        raise DatasetError(
            f"{data_dir}: expected the rater-training entries {CLIVE_TRAINING} first, "
            f"found {head} — is this the CLIVE release?"
        )
    rows = [Row(str(n), float(m)) for n, m in zip(names, mos)]
    return rows if include_training else rows[len(CLIVE_TRAINING) :]


@register("clive", Spec((0.0, 100.0), lower_is_better=False))
def clive(root: Path) -> Labels:
    """CLIVE / LIVE In the Wild: ``Images/`` + ``Data/*.mat``, 1,162 rated test images."""
    return Labels(clive_labels(root / "Data"), root / "Images")


SPAQ_LABELS = Path("Annotations") / "MOS and Image attribute scores.xlsx"


@register("spaq", Spec((0.0, 100.0), lower_is_better=False, resize_short_side=512))
def spaq(root: Path, *, image_dir: str = "TestImage") -> Labels:
    """SPAQ: ``Image name``/``MOS`` of the annotation sheet (a same-named ``.csv`` export is
    preferred when present, so openpyxl is optional); images in ``TestImage/``."""
    columns = ("Image name", "MOS")
    export = (root / SPAQ_LABELS).with_suffix(".csv")
    table = read_csv(export, columns) if export.is_file() else read_xlsx(root / SPAQ_LABELS, columns)
    rows = [Row(r["Image name"], to_float(r["MOS"], f"SPAQ {r['Image name']}")) for r in table]
    return Labels(rows, root / image_dir)


FLIVE_LABELS, FLIVE_TEST, FLIVE_TRAIN_VAL = "labels_image.csv", "labels640.csv", "labels=640_padded.csv"


@register("flive", Spec((0.0, 100.0), lower_is_better=False))
def flive(root: Path) -> Labels:
    """FLIVE (PaQ-2-PiQ) whole images: ``name``/``mos`` of ``labels_image.csv`` in the root or its
    ``database/``; names are paths relative to that folder. Splits follow pyiqa: test =
    ``labels640.csv``, val = ``is_valid`` rows of ``labels=640_padded.csv``, the rest train."""
    base = root / "database" if (root / "database" / FLIVE_LABELS).is_file() else root
    table = read_csv(base / FLIVE_LABELS, ("name", "mos"))
    splits = _flive_splits(base)
    default = "train" if splits else None
    rows = [
        Row(r["name"], to_float(r["mos"], f"{FLIVE_LABELS} {r['name']}"), splits.get(r["name"], default)) for r in table
    ]
    return Labels(rows, base)


def _flive_splits(base: Path) -> dict[str, str]:
    splits: dict[str, str] = {}
    if (base / FLIVE_TRAIN_VAL).is_file():
        for r in read_csv(base / FLIVE_TRAIN_VAL, ("name_image", "is_valid")):
            if r["is_valid"].strip().lower() in ("true", "1"):
                splits[r["name_image"]] = "val"
    if (base / FLIVE_TEST).is_file():
        splits.update({r["name_image"]: "test" for r in read_csv(base / FLIVE_TEST, ("name_image",))})
    return splits


@register("kadid10k", Spec((1.0, 5.0), lower_is_better=False))
def kadid10k(root: Path) -> Labels:
    """KADID-10k: ``dist_img``/``dmos`` of ``dmos.csv`` (1-5, higher better despite the name);
    ``images/`` also holds the 81 references (``ref_img``), which are expected and unrated."""
    table = read_csv(root / "dmos.csv", ("dist_img", "ref_img", "dmos"))
    rows = [Row(r["dist_img"], to_float(r["dmos"], f"dmos.csv {r['dist_img']}")) for r in table]
    return Labels(rows, root / "images", ignore=frozenset(r["ref_img"] for r in table))


@register("csiq", Spec((0.0, 1.0), lower_is_better=True))
def csiq(root: Path, *, labels: str = "csiq_label.txt", image_dir: str = "dst_imgs") -> Labels:
    """CSIQ: ``<image> <dmos>`` lines (DMOS 0-1, lower better); images found by file name anywhere
    under ``dst_imgs/`` (the release keeps one subfolder per distortion type)."""
    entries = read_columns(root / labels, 2)
    base = root / image_dir
    where = {
        p.name.lower(): p.relative_to(base).as_posix() for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
    }
    rows = [Row(where.get(name.lower(), name), to_float(dmos, f"{labels} {name}")) for name, dmos, *_ in entries]
    return Labels(rows, base)


@register("tid2013", Spec((0.0, 9.0), lower_is_better=False))
def tid2013(root: Path) -> Labels:
    """TID2013: ``<mos> <name>`` lines of ``mos_with_names.txt`` (0-9, higher better); images in
    ``distorted_images/`` (name case is matched loosely: the release mixes i25/I25)."""
    entries = read_columns(root / "mos_with_names.txt", 2)
    rows = [Row(name, to_float(mos, f"mos_with_names.txt {name}")) for mos, name, *_ in entries]
    return Labels(rows, root / "distorted_images")


LIVE_FOLDERS = (("jp2k", 227), ("jpeg", 233), ("wn", 174), ("gblur", 174), ("fastfading", 174))


@register("live", Spec((0.0, 100.0), lower_is_better=True))
def live(root: Path, *, dmos_file: str = "dmos.mat") -> Labels:
    """LIVE IQA release 2: ``dmos`` (or ``dmos_new`` of ``dmos_realigned.mat``) and ``orgs`` in
    release order over ``jp2k/ jpeg/ wn/ gblur/ fastfading/`` ``img<k>.bmp``; entries with
    ``orgs == 1`` are copies of the references and are dropped, leaving 779 distorted images."""
    names = [f"{folder}/img{k}.bmp" for folder, n in LIVE_FOLDERS for k in range(1, n + 1)]
    dmos = read_mat_vector(root / dmos_file, "dmos_new", "dmos").astype(float)
    orgs = read_mat_vector(root / dmos_file, "orgs").astype(int)
    if not len(dmos) == len(orgs) == len(names):
        raise DatasetError(
            f"{root / dmos_file}: expected {len(names)} dmos/orgs entries, "
            f"got {len(dmos)}/{len(orgs)} — is this LIVE release 2?"
        )
    rows = [Row(n, float(d)) for n, d, o in zip(names, dmos, orgs) if o == 0]
    return Labels(rows, root, ignore=frozenset(n for n, o in zip(names, orgs) if o != 0))


@register("agiqa3k", Spec((0.0, 5.0), lower_is_better=False))
def agiqa3k(root: Path, *, score: str = "mos_quality", image_dir: str | None = None) -> Labels:
    """AGIQA-3K: ``name`` and ``mos_quality`` (or ``score='mos_align'``) of ``data.csv``; images in
    ``AGIQA-3K/`` when that folder exists, else beside ``data.csv``."""
    table = read_csv(root / "data.csv", ("name", score))
    folder = root / (image_dir or ("AGIQA-3K" if (root / "AGIQA-3K").is_dir() else "."))
    return Labels([Row(r["name"], to_float(r[score], f"data.csv {r['name']}")) for r in table], folder)


@register("csv")
def generic_csv(
    root: Path,
    *,
    mos_range,
    lower_is_better: bool,
    labels: str = "labels.csv",
    image_dir: str = ".",
    resize_short_side: int | None = None,
) -> Labels:
    """Any set as an ``image,mos[,split]`` CSV (``labels``, relative to root) with a declared
    ``mos_range`` and ``lower_is_better``; image names are relative to ``image_dir``."""
    spec = declared_spec(mos_range, lower_is_better, resize_short_side)
    table = read_csv(root / labels, ("image", "mos"))
    rows = [Row(r["image"], to_float(r["mos"], f"{labels} {r['image']}"), split_name(r.get("split"))) for r in table]
    return Labels(rows, root / image_dir, spec=spec)


@register("pyiqa")
def pyiqa_meta(
    root: Path,
    *,
    meta_info: str,
    mos_range,
    lower_is_better: bool,
    image_dir: str = ".",
    split_column: str | None = None,
    split_file: str | None = None,
    split_index: int = 1,
    resize_short_side: int | None = None,
) -> Labels:
    """A pyiqa meta-info CSV: NR files list ``name, mos, ...``; FR files ``ref_name, dist_name,
    mos, ...`` (the distorted image is scored; references beside it are expected). Splits come from ``split_column`` (default:
    ``official_split``, else the only column whose name contains ``split``), or from a pyiqa
    ``split_file`` ``{index: {'train'|'val'|'test': [row, ...]}}``, JSON or a pickle of plain
    containers (`readers.read_split_file`: nothing in it is ever run)."""
    spec = declared_spec(mos_range, lower_is_better, resize_short_side)
    table = read_csv(root / meta_info, ())
    header = list(table[0]) if table else []
    at = header.index("dist_name") if "dist_name" in header else 0
    if len(header) < at + 2:
        raise DatasetError(
            f"{root / meta_info}: expected rows with a name column followed by a score column, got header {header}"
        )
    image_col, mos_col = header[at], header[at + 1]
    splits = _pyiqa_splits(root, table, header, split_column, split_file, split_index)
    rows = [Row(r[image_col], to_float(r[mos_col], f"{meta_info} {r[image_col]}"), s) for r, s in zip(table, splits)]
    refs = frozenset(r[header[0]] for r in table) if at else frozenset()  # FR: refs may sit alongside
    return Labels(rows, root / image_dir, ignore=refs, spec=spec)


def _pyiqa_splits(root: Path, table, header, column, split_file, index) -> list[str | None]:
    if split_file is not None:
        scheme = read_split_file(root / split_file, index)
        by_row = {i: split_name(phase) for phase, rows in scheme.items() for i in rows}
        return [by_row.get(i) for i in range(len(table))]
    candidates = [c for c in header if "split" in c]
    if column is None:
        column = (
            "official_split" if "official_split" in candidates else (candidates[0] if len(candidates) == 1 else None)
        )
    if column is not None and column not in header:
        raise DatasetError(f"{root}: no split column '{column}' (split columns: {candidates})")
    return [split_name(r.get(column)) if column else None for r in table]


def declared_spec(mos_range, lower_is_better, resize_short_side) -> Spec:
    """A `Spec` from caller-declared options, or DatasetError saying which one is malformed."""
    try:
        lo, hi = (float(v) for v in mos_range)
    except (TypeError, ValueError):
        raise DatasetError(f"mos_range must be two numbers (low, high), got {mos_range!r}") from None
    if not lo < hi:
        raise DatasetError(f"mos_range must have low < high, got {mos_range!r}")
    if not isinstance(lower_is_better, (bool, np.bool_)):
        raise DatasetError(f"lower_is_better must be true or false, got {lower_is_better!r}")
    if resize_short_side is not None and (not isinstance(resize_short_side, int) or resize_short_side <= 0):
        raise DatasetError(f"resize_short_side must be a positive integer or None, got {resize_short_side!r}")
    return Spec((lo, hi), bool(lower_is_better), resize_short_side)


def split_name(value) -> str | None:
    """A released split label in this project's words (train/val/test); blank -> None."""
    text = str(value).strip().lower() if value is not None else ""
    return SPLIT_NAMES.get(text, text) or None
