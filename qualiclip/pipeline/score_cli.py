"""``qualiclip score``: score files, folders (recursive) or list files; write CSV or JSON.

Files that cannot be scored (unreadable, FIFOs, too small, above the memory budget, a name no
file can have: `imageio.check_path_text`) are reported on stderr and kept in the output with an ``error`` and no score, so the output has one
row per input file, in input order, plus one per folder that could not be listed. The output
says what the scores are: the model (URI or checkpoint path) and its registered version, the
score range and its direction (pyiqa's convention: ``higher_is_better``) — as columns of every
CSV row, and as keys beside the ``scores`` list in JSON.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..file_scoring import score_paths
from ..files import FileReadError, read_regular
from ..imageio import DEFAULT_MAX_PIXELS, BadPathError, check_path_text, scan_tree, shown_path
from ..inference import load_scorer
from ..ingest import IngestConfig
from ..memory import MIN_MEMORY_BUDGET, ScoringError
from ..model import HIGHER_IS_BETTER, SCORE_RANGE, QualiCLIP
from .paths import stage_paths
from .tracking_config import read_version_file

LIST_SUFFIXES = (".txt", ".lst", ".list")
COLUMNS = ("path", "score", "width", "height", "error")
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
MAX_LIST_BYTES = 1 << 30  # a list file of 1 GB names ~10 million images; anything larger is not a list
MAX_MEMORY_GB = 1e6  # a fixed ceiling for --max-memory-gb (1 PB); the device's own memory is the real one


@dataclass(frozen=True)
class ModelOptions:
    """Which model, where and how precise: the options ``score`` and ``explain`` share."""

    model: str | None = None  # checkpoint folder, official .pth, MLflow URI; None: what dvc.yaml evaluates
    device: str = "auto"
    precision: str = "fp32"
    threads: int = 0  # CPU threads for torch; 0: torch's default
    max_memory_gb: float | None = None  # budget for scoring one image; None: half the device's memory

    def __post_init__(self) -> None:  # before the model is loaded; the device's own bound is checked at use
        gb = self.max_memory_gb
        if gb is not None and not (isinstance(gb, (int, float)) and MIN_MEMORY_BUDGET / 1e9 <= gb <= MAX_MEMORY_GB):
            raise ScoringError(
                f"--max-memory-gb must be a number from {MIN_MEMORY_BUDGET / 1e9:g} to at most the "
                f"memory of the scoring device, got {gb!r} — leave it out for half the device's memory"
            )

    @property
    def max_memory(self) -> int | None:
        """``max_memory_gb`` in bytes (None: the library's default budget)."""
        return None if self.max_memory_gb is None else int(self.max_memory_gb * 1e9)


def check_out_file(out: Path, flag: str = "--out") -> None:
    """Refuse an output path that cannot become a file, before any work: a name no file can have
    (`check_path_text`), an existing folder, or a path under a file."""
    try:
        check_path_text(out)
    except BadPathError as exc:
        raise ScoringError(f"{flag} {exc.path}: {exc.detail}") from None
    if out.is_dir():
        raise ScoringError(
            f"{flag} {out} is a folder — name a file in it, e.g. {out / ('scores' + (out.suffix or '.csv'))}"
        )
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ScoringError(f"{flag} {out}: {parent} is a file, not a folder — choose another {flag}")


def collect_paths(inputs: list[str], extensions: tuple[str, ...]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand folders recursively and list files; keep order, drop duplicates.

    A path that does not exist is kept: it is reported as unreadable in the output. Also
    returns ``(folder, why)`` for every folder that could not be listed.
    """
    out: list[Path] = []
    unlisted: list[tuple[Path, str]] = []
    for item in inputs:
        p = Path(item)
        if not _is_path_text(p):  # kept: `read_image` reports it as that one file's bad_name
            out.append(p)
        elif p.is_dir():
            scan = scan_tree(p, extensions)
            out.extend(scan.images)
            unlisted.extend(scan.unlisted)
        elif p.suffix.lower() in LIST_SUFFIXES:
            out.extend(read_list_file(p))
        else:
            out.append(p)
    return list(dict.fromkeys(out)), unlisted


def _is_path_text(path: Path) -> bool:
    try:
        check_path_text(path)
    except BadPathError:
        return False
    return True


def read_list_file(path: Path) -> list[Path]:
    """Paths in a list file, one per line; blank lines and ``#`` comments skipped.

    Bytes that are not UTF-8 are kept as the file system keeps them (surrogate escapes), so a
    listed file with such a name is still found.
    """
    try:
        text = read_regular(path, max_bytes=MAX_LIST_BYTES).decode("utf-8", errors="surrogateescape")
    except FileReadError as exc:
        raise ScoringError(f"list file {path}: {exc.detail}") from None
    lines = [line.strip() for line in text.splitlines()]
    entries = [Path(line) for line in lines if line and not line.startswith("#")]
    return [e if e.is_absolute() else path.parent / e for e in entries]


@dataclass(frozen=True)
class ResolvedModel:
    """The checkpoint to load for a ``--model`` value, and what to call it in the output."""

    checkpoint: Path
    uri: str  # the MLflow URI as given, or the checkpoint's absolute path
    version: str | None = None  # its registered version, when known

    def describe(self) -> dict:
        """What the scores are: the model, its version, the score range and direction."""
        return {
            "model": self.uri,
            "model_version": self.version or "",
            "score_min": SCORE_RANGE[0],
            "score_max": SCORE_RANGE[1],
            "higher_is_better": HIGHER_IS_BETTER,
        }


def resolve_model(spec: str | None) -> ResolvedModel:
    """The local checkpoint for a path or an MLflow model URI (downloaded to MLflow's cache).

    ``None`` is the checkpoint that dvc.yaml's evaluate stage evaluates, in the current folder;
    its version is the one the train stage registered (``registered_model.json`` beside it).
    """
    spec = spec if spec is not None else stage_paths().checkpoint
    if spec.startswith(MLFLOW_SCHEMES):
        from .tracking_mlflow import download_model  # optional (the `pipeline` extra): only for a registry or run URI

        local, version = download_model(spec)
        return ResolvedModel(local / "artifacts" / "checkpoint", spec, version)
    path = Path(spec)
    if not path.exists():
        raise ScoringError(f"model {spec} not found — train first (`dvc repro`) or pass --model CHECKPOINT")
    return ResolvedModel(path, str(path.resolve()), read_version_file(path).get("version"))


def open_scorer(opts: ModelOptions) -> tuple[QualiCLIP, ResolvedModel]:
    """The scoring-only model of ``opts.model`` (image encoder only), with ``opts.threads`` applied."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    model = resolve_model(opts.model)
    return load_scorer(model.checkpoint), model


def run_score(
    inputs: list[str],
    out: Path,
    opts: ModelOptions,
    *,
    batch_size: int = 8,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> list[dict]:
    """Score ``inputs`` (files, folders, list files) into ``out`` (.csv or .json); returns the rows."""
    out = Path(out)
    if out.suffix.lower() not in (".csv", ".json"):
        raise ScoringError(f"--out must end in .csv or .json, got {out.name}")
    check_out_file(out)
    extensions = IngestConfig().extensions
    paths, unlisted = collect_paths(inputs, extensions)
    if not paths and not unlisted:
        raise ScoringError(f"no images found in {inputs} (extensions {', '.join(extensions)})")
    scorer, model = open_scorer(opts)
    with tqdm(total=len(paths), desc="score", unit="img", disable=None if progress else True) as bar:
        results = score_paths(
            paths,
            scorer,
            batch_size=batch_size,
            device=opts.device,
            precision=opts.precision,
            max_pixels=max_pixels,
            progress=bar,
            max_memory=opts.max_memory,
            max_pixels_option="--max-pixels",
        )
    rows = [
        {
            "path": shown_path(r.path),
            "score": r.score,  # unrounded: saturated scores differ past 6 decimals
            "width": r.width,
            "height": r.height,
            "error": r.error,
        }
        for r in results
    ]
    rows += [
        {
            "path": shown_path(folder),
            "score": None,
            "width": None,
            "height": None,
            "error": f"unreadable: {why} (its images are not scored)",
        }
        for folder, why in unlisted
    ]
    for r in rows:
        if r["error"]:
            print(f"not scored {r['path']}: {r['error']}", file=sys.stderr)
    write_rows(out, rows, model.describe())
    bad = sum(1 for r in rows if r["error"])
    print(f"scored {len(rows) - bad} images -> {out}" + (f" ({bad} not scored, listed with an error)" if bad else ""))
    return rows


def write_rows(out: Path, rows: list[dict], about: dict) -> None:
    """``rows`` to CSV (``about``'s keys as columns of every row) or JSON (``about`` + ``scores``),
    by suffix. A file name that is not valid UTF-8 keeps its undecodable bytes as ``\\udcXX``
    escapes, in CSV as in JSON (where they decode back to the same name)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".json":
            out.write_text(json.dumps({**about, "scores": rows}, indent=1))
            return
        with open(out, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
            w = csv.DictWriter(f, fieldnames=[*COLUMNS, *about])
            w.writeheader()
            w.writerows({**r, **about} for r in rows)
    except OSError as exc:
        raise ScoringError(f"cannot write --out {out}: {exc.strerror or exc} — choose another --out") from None
