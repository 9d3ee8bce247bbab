"""``qualiclip score``: score files, folders (recursive) or list files; write CSV or JSON.

Unreadable files are reported on stderr and kept in the output with an ``error`` and no score,
so the output has one row per input file, in input order.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from .errors import QualiclipError

DEFAULT_MODEL = "outputs/train/checkpoint"
LIST_SUFFIXES = (".txt", ".lst", ".list")
COLUMNS = ("path", "score", "width", "height", "error")


class ScoreError(QualiclipError, RuntimeError):
    """Nothing to score, or an output/model argument that cannot work."""


def add_model_args(sp: argparse.ArgumentParser) -> None:
    """Options shared by ``score`` and ``explain``: which model, where, how precise."""
    sp.add_argument("--model", default=DEFAULT_MODEL,
                    help="checkpoint folder, official .pth file, or MLflow URI (models:/qualiclip@champion, runs:/ID/model)")
    sp.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    sp.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                    help="bf16/fp16 autocast: faster on GPU (fp16 GPU only); scores differ by ~1e-3")
    sp.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")


def add_score_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("paths", nargs="+",
                    help="image files, folders (recursive), or .txt/.lst/.list files (one path per line, "
                         "relative paths taken from the list file's folder, '#' comments)")
    sp.add_argument("--out", required=True, help="scores.csv or scores.json")
    add_model_args(sp)
    sp.add_argument("--batch-size", type=int, default=8,
                    help="images of equal size scored together (capped at 0.8 MP per batch to bound memory)")
    sp.add_argument("--max-pixels", type=int, default=89_478_485, help="decompression-bomb guard")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def collect_paths(inputs: list[str], extensions: tuple[str, ...]) -> list[Path]:
    """Expand folders recursively and list files; keep order, drop duplicates.

    A path that does not exist is kept: it is reported as unreadable in the output.
    """
    from .imageio import iter_image_files

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
        raise ScoreError(f"list file {path} not found")
    lines = [line.strip() for line in path.read_text().splitlines()]
    entries = [Path(line) for line in lines if line and not line.startswith("#")]
    return [e if e.is_absolute() else path.parent / e for e in entries]


def resolve_model_path(spec: str) -> Path:
    """The local checkpoint for a path or an MLflow model URI (downloaded to MLflow's cache)."""
    if spec.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        import mlflow.artifacts

        return Path(mlflow.artifacts.download_artifacts(spec)) / "artifacts" / "checkpoint"
    if not Path(spec).exists():
        raise ScoreError(f"model {spec} not found — train first (`dvc repro`) or pass --model CHECKPOINT")
    return Path(spec)


def load_scorer(args):
    """The scoring-only model of ``--model`` (image encoder only), with ``--threads`` applied."""
    import torch

    from .scoring import load_scorer as load

    if args.threads:
        torch.set_num_threads(args.threads)
    return load(resolve_model_path(args.model))


def run_score(args) -> None:
    from tqdm import tqdm

    from .ingest import IngestConfig
    from .scoring import ScoringError, score_paths

    out = Path(args.out)
    if out.suffix.lower() not in (".csv", ".json"):
        raise ScoreError(f"--out must end in .csv or .json, got {out.name}")
    paths = collect_paths(args.paths, IngestConfig().extensions)
    if not paths:
        raise ScoreError(f"no images found in {args.paths} (extensions {', '.join(IngestConfig().extensions)})")
    scorer = load_scorer(args)
    with tqdm(total=len(paths), desc="score", unit="img", disable=args.no_progress) as bar:
        try:
            results = score_paths(paths, scorer, batch_size=args.batch_size, device=args.device,
                                  precision=args.precision, max_pixels=args.max_pixels, progress=bar)
        except ScoringError as exc:  # a bad option: the message names the fix
            raise ScoreError(str(exc)) from None
    rows = [{"path": str(r.path), "score": r.score,  # unrounded: saturated scores differ past 6 decimals
             "width": r.width, "height": r.height, "error": r.error} for r in results]
    for r in rows:
        if r["error"]:
            print(f"unreadable {r['path']}: {r['error']}", file=sys.stderr)
    write_rows(out, rows)
    bad = sum(1 for r in rows if r["error"])
    print(f"scored {len(rows) - bad} images -> {out}" + (f" ({bad} unreadable, listed with an error)" if bad else ""))


def write_rows(out: Path, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(rows, indent=1))
        return
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(rows)
