"""``qualiclip score``: score files, folders (recursive) or list files; write CSV or JSON.

Unreadable files are reported on stderr and kept in the output with an ``error`` and no score,
so the output has one row per input file, in input order.
"""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..imageio import DEFAULT_MAX_PIXELS, iter_image_files
from ..ingest import IngestConfig
from ..model import QualiCLIP
from ..scoring import ScoringError, load_scorer, score_paths
from .paths import stage_paths

LIST_SUFFIXES = (".txt", ".lst", ".list")
COLUMNS = ("path", "score", "width", "height", "error")
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


@dataclass(frozen=True)
class ModelOptions:
    """Which model, where and how precise: the options ``score`` and ``explain`` share."""

    model: str | None = None  # checkpoint folder, official .pth, MLflow URI; None: what dvc.yaml evaluates
    device: str = "auto"
    precision: str = "fp32"
    threads: int = 0          # CPU threads for torch; 0: torch's default


def collect_paths(inputs: list[str], extensions: tuple[str, ...]) -> list[Path]:
    """Expand folders recursively and list files; keep order, drop duplicates.

    A path that does not exist is kept: it is reported as unreadable in the output.
    """
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(iter_image_files(p, extensions))
        elif p.suffix.lower() in LIST_SUFFIXES:
            out.extend(read_list_file(p))
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def read_list_file(path: Path) -> list[Path]:
    """Paths in a list file, one per line; blank lines and ``#`` comments skipped."""
    if not path.is_file():
        raise ScoringError(f"list file {path} not found")
    lines = [line.strip() for line in path.read_text().splitlines()]
    entries = [Path(line) for line in lines if line and not line.startswith("#")]
    return [e if e.is_absolute() else path.parent / e for e in entries]


def resolve_model_path(spec: str | None) -> Path:
    """The local checkpoint for a path or an MLflow model URI (downloaded to MLflow's cache).

    ``None`` is the checkpoint that dvc.yaml's evaluate stage evaluates, in the current folder.
    """
    spec = spec if spec is not None else stage_paths().checkpoint
    if spec.startswith(MLFLOW_SCHEMES):
        import mlflow.artifacts  # optional (the `pipeline` extra): only for a registry or run URI

        return Path(mlflow.artifacts.download_artifacts(spec)) / "artifacts" / "checkpoint"
    if not Path(spec).exists():
        raise ScoringError(f"model {spec} not found — train first (`dvc repro`) or pass --model CHECKPOINT")
    return Path(spec)


def open_scorer(opts: ModelOptions) -> QualiCLIP:
    """The scoring-only model of ``opts.model`` (image encoder only), with ``opts.threads`` applied."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    return load_scorer(resolve_model_path(opts.model))


def run_score(inputs: list[str], out: Path, opts: ModelOptions, *, batch_size: int = 8,
              max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True) -> list[dict]:
    """Score ``inputs`` (files, folders, list files) into ``out`` (.csv or .json); returns the rows."""
    out = Path(out)
    if out.suffix.lower() not in (".csv", ".json"):
        raise ScoringError(f"--out must end in .csv or .json, got {out.name}")
    extensions = IngestConfig().extensions
    paths = collect_paths(inputs, extensions)
    if not paths:
        raise ScoringError(f"no images found in {inputs} (extensions {', '.join(extensions)})")
    scorer = open_scorer(opts)
    with tqdm(total=len(paths), desc="score", unit="img", disable=None if progress else True) as bar:
        results = score_paths(paths, scorer, batch_size=batch_size, device=opts.device, precision=opts.precision,
                              max_pixels=max_pixels, progress=bar)
    rows = [{"path": str(r.path), "score": r.score,  # unrounded: saturated scores differ past 6 decimals
             "width": r.width, "height": r.height, "error": r.error} for r in results]
    for r in rows:
        if r["error"]:
            print(f"unreadable {r['path']}: {r['error']}", file=sys.stderr)
    write_rows(out, rows)
    bad = sum(1 for r in rows if r["error"])
    print(f"scored {len(rows) - bad} images -> {out}" + (f" ({bad} unreadable, listed with an error)" if bad else ""))
    return rows


def write_rows(out: Path, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(rows, indent=1))
        return
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(rows)
