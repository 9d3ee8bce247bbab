"""Where the stages read and write, read from dvc.yaml: the one home of the stage paths.

dvc.yaml names every path once, as an argument of its stage's command
(``qualiclip train --shards data/shards --out outputs/train``). The Prefect flows,
``qualiclip promote`` and ``qualiclip score`` take their default paths from those arguments, so
a path changed in dvc.yaml is changed everywhere.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import QualiclipError

DVC_FILE = "dvc.yaml"


class StagePathError(QualiclipError, ValueError):
    """dvc.yaml is missing, or a stage command lacks the argument a default is read from."""


@dataclass(frozen=True)
class StagePaths:
    """The pipeline's paths, relative to the project folder, as dvc.yaml's stage commands name them."""

    ingest: str  # ingest --out
    shards: str  # degrade --out
    train: str  # train --out
    checkpoint: str  # evaluate --model: the checkpoint that is evaluated and promoted
    evaluate: str  # evaluate --out
    metrics: str  # the evaluate stage's metrics file


def stage_paths(project_dir: str | Path = ".") -> StagePaths:
    """The stage paths of the project at ``project_dir``, from its dvc.yaml."""
    dvc_file = Path(project_dir) / DVC_FILE
    stages = _read_stages(dvc_file)

    def argument(stage: str, flag: str) -> str:
        return _argument(stages, stage, flag, dvc_file)

    ingest, shards, train = argument("ingest", "--out"), argument("degrade", "--out"), argument("train", "--out")
    checkpoint, evaluate = argument("evaluate", "--model"), argument("evaluate", "--out")
    return StagePaths(ingest, shards, train, checkpoint, evaluate, _metrics_file(stages, "evaluate", dvc_file))


@dataclass(frozen=True)
class PlusPaths:
    """The QualiCLIP+ stage's paths, relative to the project folder, as dvc.yaml's plus stage names them."""

    checkpoint: str  # plus --out, then checkpoint/: the QualiCLIP+ model that `qualiclip promote --plus` promotes
    metrics: str  # the plus stage's metrics file (its evaluation), per-image scores beside it


def plus_paths(project_dir: str | Path = ".") -> PlusPaths:
    """The plus stage's paths in the project at ``project_dir``, from its dvc.yaml."""
    dvc_file = Path(project_dir) / DVC_FILE
    stages = _read_stages(dvc_file)
    out = _argument(stages, "plus", "--out", dvc_file)
    return PlusPaths(f"{out.rstrip('/')}/checkpoint", _metrics_file(stages, "plus", dvc_file))


def _argument(stages: dict, stage: str, flag: str, dvc_file: Path) -> str:
    """The value of ``flag`` in ``stage``'s cmd."""
    words = shlex.split(str(_stage(stages, stage, dvc_file).get("cmd", "")))
    for i, word in enumerate(words[:-1]):
        if word == flag:
            return words[i + 1]
    raise StagePathError(f"{dvc_file}: the '{stage}' stage's cmd has no '{flag} PATH' argument")


def _metrics_file(stages: dict, stage: str, dvc_file: Path) -> str:
    """The first ``metrics`` entry of ``stage``."""
    metrics = [next(iter(m)) if isinstance(m, dict) else m for m in _stage(stages, stage, dvc_file).get("metrics", [])]
    if not metrics:
        raise StagePathError(f"{dvc_file}: the {stage} stage lists no metrics file")
    return str(metrics[0])


def stage_deps(project_dir: str | Path, stage: str) -> list[str]:
    """The ``deps`` of ``stage`` in the project's dvc.yaml, as written there."""
    dvc_file = Path(project_dir) / DVC_FILE
    deps = _stage(_read_stages(dvc_file), stage, dvc_file).get("deps") or []
    return [str(next(iter(d)) if isinstance(d, dict) else d) for d in deps]


def check_sources_are_deps(
    sources: list[str],
    stage: str,
    project_dir: str | Path = ".",
    *,
    key: str = "ingest.sources",
    news: str = "new photos",
) -> None:
    """Fail unless every source folder is, or lies inside, a dependency of ``stage`` in dvc.yaml.

    DVC reruns a stage only when a declared dependency changes: a source folder that is not one
    would be read once and its new photos never seen. ``sources`` are folders relative to
    ``project_dir`` (or absolute); pass only real folders (not the special source ``skimage``).
    """
    project = Path(project_dir).resolve()
    deps = [(project / d).resolve() for d in stage_deps(project, stage)]
    for source in sources:
        folder = (project / source).resolve()
        if not any(folder == d or folder.is_relative_to(d) for d in deps):
            raise StagePathError(
                f"{key} lists {source!r}, but the '{stage}' stage in {project / DVC_FILE} "
                f"does not depend on it, so {news} there would never rerun the pipeline — "
                f"add '- {source}' to that stage's deps"
            )


def _read_stages(dvc_file: Path) -> dict:
    if not dvc_file.is_file():
        raise StagePathError(
            f"no {DVC_FILE} at {dvc_file} — run from the project folder (or pass --project), "
            "or give the paths explicitly"
        )
    stages = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages")
    if not isinstance(stages, dict):
        raise StagePathError(f"{dvc_file} has no 'stages' mapping")
    return stages


def _stage(stages: dict, name: str, dvc_file: Path) -> dict:
    if not isinstance(stages.get(name), dict):
        raise StagePathError(f"{dvc_file} has no '{name}' stage (stages: {', '.join(stages) or 'none'})")
    return stages[name]
