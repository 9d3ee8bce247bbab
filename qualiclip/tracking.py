"""Experiment tracking behind a small interface with a no-op default.

The library (the train stage) logs through `Tracker`; the pipeline app chooses the tracker
(`qualiclip.pipeline.tracking_config.get_tracker`) and holds the MLflow implementation
(`qualiclip.pipeline.tracking_mlflow`). Nothing in the library imports mlflow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DatasetRef:
    """A dataset a run consumes, as the tracker records it (an MLflow dataset input).

    ``digest`` names the content (equal digests, equal data), ``source`` where it lives (a file
    or folder), ``rows`` a small table of it that the tracker may keep with the reference (the
    manifest's rows, the shard list), ``targets`` the label column of ``rows`` if it has one.
    """

    name: str
    source: str
    digest: str
    rows: tuple[dict, ...] = ()
    targets: str | None = None


@dataclass(frozen=True)
class ModelRef:
    """What `Tracker.log_model` logged: the tracker's id of the model and its registered version."""

    model_id: str
    version: str | None = None


class Tracker:
    """No-op tracker: every method accepts the call and does nothing."""

    enabled = False

    @contextlib.contextmanager
    def run(self, stage: str, tags: dict[str, str] | None = None) -> Iterator[Tracker]:
        yield self

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(
        self,
        metrics: dict[str, Any],
        step: int | None = None,
        *,
        model_id: str | None = None,
        dataset: DatasetRef | None = None,
    ) -> None:
        """Log the numbers of ``metrics`` (nested dicts flattened with dots); ``model_id``: they
        measure that logged model, ``dataset``: on that data."""

    def log_input(self, dataset: DatasetRef, context: str) -> None:
        """Record that this run consumes ``dataset`` (``context``: e.g. ``training``, ``evaluation``)."""

    def link_model(self, model_id: str) -> bool:
        """Record that this run uses the logged model ``model_id``; False when the tracker does not
        know it (a model of another store): then nothing may be logged against it."""
        return False

    def log_table(self, rows: list[dict], artifact_file: str) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_figure(self, path: Path) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_model(
        self, checkpoint_dir: Path, *, register_as: str | None, description: str, tags: dict[str, str]
    ) -> ModelRef | None:
        return None
