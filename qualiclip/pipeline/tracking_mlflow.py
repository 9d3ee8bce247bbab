"""MLflow implementation of `Tracker`, and the project's tracking store and registry client.

With `serving` (the pyfunc model it logs), the place where mlflow is imported at module level;
`promotion` and `score_cli` import it only when a registry or a ``models:/`` URI is used.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.tracking import MlflowClient

from ..tracking import Tracker

DEFAULT_URI = "sqlite:///mlflow.db"  # the embedded default store, in the project folder


class MlflowTracker(Tracker):
    """Logs to ``MLFLOW_TRACKING_URI`` (default: SQLite ``mlflow.db`` in the working directory)."""

    enabled = True

    def __init__(self, experiment: str, pipeline: str):
        # Read before set_tracking_uri, which exports MLFLOW_TRACKING_URI to this process.
        self.explicit_uri = "MLFLOW_TRACKING_URI" in os.environ
        self.uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient()
        self.experiment_id = self._experiment(experiment)
        self.pipeline = pipeline

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:") and not self.explicit_uri:
            location = Path("mlartifacts").resolve().as_uri()  # beside mlflow.db, not in ~/
        return self.client.create_experiment(name, artifact_location=location)

    def _parent_run(self) -> str:
        """The pipeline's parent run, created on first use."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`qualiclip.pipeline_id` = '{self.pipeline}' and tags.`qualiclip.kind` = 'pipeline'",
            max_results=1,
        )
        if found:
            return found[0].info.run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"pipeline {self.pipeline}",
            tags={"qualiclip.pipeline_id": self.pipeline, "qualiclip.kind": "pipeline"},
        )
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id

    @contextlib.contextmanager
    def run(self, stage: str, tags: dict[str, str] | None = None) -> Iterator["MlflowTracker"]:
        all_tags = {"qualiclip.pipeline_id": self.pipeline, "qualiclip.kind": "stage", "qualiclip.stage": stage, **(tags or {})}
        with mlflow.start_run(
            experiment_id=self.experiment_id, run_name=stage, parent_run_id=self._parent_run(), tags=all_tags
        ) as run:
            self.run_id = run.info.run_id
            yield self

    def log_params(self, params: dict[str, Any]) -> None:
        mlflow.log_params({k: ("" if v is None else v) for k, v in flatten(params).items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in flatten(metrics).items() if _is_number(v)}, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path)

    def log_figure(self, path: Path) -> None:
        mlflow.log_artifact(str(path), "plots")

    def set_tags(self, tags: dict[str, str]) -> None:
        mlflow.set_tags(tags)

    def log_model(self, checkpoint_dir: Path, *, register_as: str | None, description: str, tags: dict[str, str]) -> str | None:
        """Log the checkpoint as a pyfunc model; register a version carrying ``tags``; return it."""
        from .serving import log_pyfunc  # imports torch and open_clip: only the train stage logs a model

        info = log_pyfunc(checkpoint_dir, registered_model_name=register_as)
        if not register_as:
            return None
        version = str(info.registered_model_version)
        self.client.update_model_version(register_as, version, description=description)
        for k, v in tags.items():
            self.client.set_model_version_tag(register_as, version, k, str(v))
        return version


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


def tracking_uri(project_dir: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's SQLite store as an absolute URI.

    Absolute, so a process whose working directory is not the project (a Prefect worker, the
    promote step) reads the same store the DVC stages wrote.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + str(Path(project_dir).resolve() / DEFAULT_URI.removeprefix("sqlite:///"))


def registry_client(project_dir: str | Path = ".") -> MlflowClient:
    """A client for the project's tracking store and model registry (no global state touched)."""
    uri = tracking_uri(project_dir)
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI", uri))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
