"""Which tracker a stage logs to, what ties the runs of one pipeline execution together, and
what the train stage registered.

The library logs through `qualiclip.tracking.Tracker`, a no-op by default. Here the stages get
the MLflow tracker when params.yaml's ``tracking`` section and the installed packages allow it.
Runs of one pipeline execution share the tag ``qualiclip.pipeline_id`` and hang under one parent
run, so they can be found together in the MLflow UI.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from annotated_types import MinLen

from ..config import check_fields
from ..errors import QualiclipError
from ..tracking import Tracker

PIPELINE_ENV = "QUALICLIP_PIPELINE_ID"
VERSION_FILE = "registered_model.json"  # beside the checkpoint folder: {"name", "version", "run_id"}


class TrackingError(QualiclipError, RuntimeError):
    """A tracking backend that cannot be used here; the message names the fix."""


@dataclass(frozen=True)
class TrackingConfig:
    """The ``tracking`` section of params.yaml."""

    backend: Literal["auto", "mlflow", "none"] = "auto"
    experiment: Annotated[str, MinLen(1)] = "qualiclip"
    registered_model: Annotated[str, MinLen(1)] = "qualiclip"

    def __post_init__(self) -> None:
        check_fields(self, "tracking")


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


def get_tracker(kind: str = "auto", *, experiment: str = "qualiclip", params_file: Path | None = None) -> Tracker:
    """``auto``: MLflow when it is installed, else no-op. ``mlflow`` requires it; ``none`` disables."""
    if kind == "none":
        return Tracker()
    try:  # mlflow is optional (the `pipeline` extra) and takes seconds to import: only when tracking
        from .tracking_mlflow import MlflowTracker
    except ImportError:
        if kind == "mlflow":
            raise TrackingError("tracking.backend is 'mlflow' but mlflow is not installed — pip install "
                                "'qualiclip[pipeline]', or set tracking.backend: auto in params.yaml") from None
        return Tracker()
    return MlflowTracker(experiment=experiment, pipeline=pipeline_id(params_file))


def write_version_file(train_out: Path, name: str, version: str | None, run_id: str | None = None) -> Path:
    """What the train stage registered, beside its checkpoint (``version`` None: nothing registered).

    Always written, so a DVC ``outs`` entry for it exists whether or not tracking is on.
    """
    path = Path(train_out) / VERSION_FILE
    path.write_text(json.dumps({"name": name, "version": version, "run_id": run_id}, indent=2) + "\n")
    return path
