"""Experiment tracking behind a small interface with a no-op default (STYLE.md §8).

The library logs through `Tracker`; `qualiclip.tracking_mlflow` is the only place that imports
mlflow. Runs of one pipeline execution share the tag ``qualiclip.pipeline_id`` and hang under
one parent run, so they can be found together in the MLflow UI.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import QualiclipError

PIPELINE_ENV = "QUALICLIP_PIPELINE_ID"


class TrackingError(QualiclipError, RuntimeError):
    """A tracking backend that cannot be used here; the message names the fix."""


class Tracker:
    """No-op tracker: every method accepts the call and does nothing."""

    enabled = False

    @contextlib.contextmanager
    def run(self, stage: str, tags: dict[str, str] | None = None) -> Iterator["Tracker"]:
        yield self

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_figure(self, path: Path) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_model(self, checkpoint_dir: Path, *, register_as: str | None, description: str, tags: dict[str, str]) -> str | None:
        return None


def pipeline_id(params_file: Path | None = None) -> str:
    """The id shared by the stage runs of one pipeline execution.

    Set by the caller through ``QUALICLIP_PIPELINE_ID`` (the Prefect flows set their flow-run
    id); otherwise a hash of params.yaml, so ``dvc repro`` groups the runs of one configuration.
    """
    if os.environ.get(PIPELINE_ENV):
        return os.environ[PIPELINE_ENV]
    if params_file and Path(params_file).is_file():
        return "params-" + hashlib.sha256(Path(params_file).read_bytes()).hexdigest()[:12]
    return "adhoc"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become strings (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def get_tracker(kind: str = "auto", *, experiment: str = "qualiclip", params_file: Path | None = None) -> Tracker:
    """``auto``: MLflow when it is installed, else no-op. ``mlflow`` requires it; ``none`` disables."""
    if kind == "none":
        return Tracker()
    try:
        from .tracking_mlflow import MlflowTracker
    except ImportError:
        if kind == "mlflow":
            raise TrackingError("tracking.backend is 'mlflow' but mlflow is not installed — pip install "
                                "'qualiclip[pipeline]', or set tracking.backend: auto in params.yaml") from None
        return Tracker()
    return MlflowTracker(experiment=experiment, pipeline=pipeline_id(params_file))
