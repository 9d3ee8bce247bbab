"""Which tracker a stage logs to (the ``tracking:`` section), and what the train stage logged and
registered (``registered_model.json``). Named apart from `qualiclip.tracking`, the interface.

The library logs through `qualiclip.tracking.Tracker`, a no-op by default. Here the stages get
the MLflow tracker when params.yaml's ``tracking`` section and the installed packages allow it,
told which pipeline execution the stage belongs to (`qualiclip.pipeline.execution`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from annotated_types import MinLen

from ..config import check_fields
from ..errors import QualiclipError
from ..tracking import Tracker
from .execution import current_execution

VERSION_FILE = "registered_model.json"  # beside the checkpoint folder: {"name", "version", "run_id", "model_id"}


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


def get_tracker(kind: str = "auto", *, experiment: str = "qualiclip") -> Tracker:
    """``auto``: MLflow when it is installed, else no-op. ``mlflow`` requires it; ``none`` disables."""
    if kind == "none":
        return Tracker()
    try:  # mlflow is optional (the `pipeline` extra) and takes seconds to import: only when tracking
        from .tracking_mlflow import MlflowTracker
    except ImportError:
        if kind == "mlflow":
            raise TrackingError(
                "tracking.backend is 'mlflow' but mlflow is not installed — pip install "
                "'qualiclip[pipeline]', or set tracking.backend: auto in params.yaml"
            ) from None
        return Tracker()
    return MlflowTracker(experiment=experiment, execution=current_execution())


def write_version_file(
    train_out: Path, name: str, version: str | None, run_id: str | None = None, model_id: str | None = None
) -> Path:
    """What the train stage logged and registered, beside its checkpoint (``version`` None:
    nothing registered; ``model_id``: the tracker's id of the logged model).

    Always written, so a DVC ``outs`` entry for it exists whether or not tracking is on.
    """
    path = Path(train_out) / VERSION_FILE
    info = {"name": name, "version": version, "run_id": run_id, "model_id": model_id}
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path


def read_version_file(checkpoint: Path) -> dict:
    """The `write_version_file` record beside ``checkpoint`` (a folder or file), or {} if there is none."""
    path = Path(checkpoint).parent / VERSION_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}
