"""Experiment tracking behind a small interface with a no-op default (STYLE.md §8).

The library (the train stage) logs through `Tracker`; the pipeline app chooses the tracker
(`qualiclip.pipeline.tracking.get_tracker`) and holds the MLflow implementation
(`qualiclip.pipeline.tracking_mlflow`). Nothing in the library imports mlflow.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator


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
