"""MLflow implementation of `Tracker`, and the project's tracking store and registry client.

With `serving` (the pyfunc model it logs), the place where mlflow is imported at module level;
`promotion` and `score_cli` import it only when a registry or a ``models:/`` URI is used.

What a run records, so that a reviewer can follow a model back to its data and code
(docs/operations.md, "Seeing the runs"):

- every stage run: ``qualiclip.stage``, ``qualiclip.execution_id`` and a parent run per pipeline
  execution (`qualiclip.pipeline.execution`), the git commit of the project
  (``mlflow.source.git.commit``), the DVC experiment (``dvc.exp_name``) when ``dvc exp run``
  runs it, and the datasets it consumes as dataset inputs;
- the parent run: started when the execution started, running while a stage runs, ended when
  the last stage ended, FAILED (with ``qualiclip.error``) when a stage failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.data.pandas_dataset import PandasDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.store.artifact.utils.models import get_model_name_and_version
from mlflow.tracking import MlflowClient
from mlflow.utils.git_utils import get_git_commit
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

from .. import __version__
from ..errors import QualiclipError
from ..tracking import DatasetRef, ModelRef, Tracker
from .execution import DVC_ROOT_ENV, Execution

DEFAULT_URI = "sqlite:///mlflow.db"  # the embedded default store, in the project folder
DVC_EXP_TAGS = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.exp_baseline_rev"}  # set by `dvc exp run`
ERROR_TAG = "qualiclip.error"  # the failure of a stage, on its run and on the parent run
MODEL_TAG = "qualiclip.model_id"  # on the evaluate run: the logged model it evaluated

# MLflow's INFO lines that no one acts on, in every run log: the input example checked against
# the signature when a model is logged, the tables created in a new sqlite store, and a
# server's registry "waiting up to 300 seconds" for a version it creates at once. Its warnings
# and errors still show.
for _chatty in ("mlflow.pyfunc", "mlflow.store.db.utils", "mlflow.store.model_registry.abstract_store"):
    logging.getLogger(_chatty).setLevel(logging.WARNING)


class ModelUriError(QualiclipError, LookupError):
    """A ``models:/`` or ``runs:/`` URI that names nothing in the store; the message names the fix."""


class TrackingServerError(QualiclipError):
    """The MLflow server refused this client for a reason its operator must fix; the message says how."""


# MLflow 3's answer (HTTP 403) to a Host header missing from the server's --allowed-hosts (loopback is allowed)
HOST_REFUSED = "Invalid Host header"


@contextlib.contextmanager
def server_errors(uri: str) -> Iterator[None]:
    """Requests to the store at ``uri``; a refused host name becomes a `TrackingServerError` naming
    ``--allowed-hosts``, not a traceback (docs/scale.md §4)."""
    try:
        yield
    except MlflowException as exc:
        if HOST_REFUSED not in str(exc):
            raise
        host = urllib.parse.urlsplit(uri).netloc.rpartition("@")[2]  # what the client sends as Host
        raise TrackingServerError(
            f"the MLflow server at {uri} refused the host name '{host}' (HTTP 403 \"{HOST_REFUSED}\") — start it "
            f"with `--allowed-hosts {host}` (comma-separated: every name:port the clients use, loopback "
            "included, since the list replaces MLflow's default)"
        ) from None


class MlflowTracker(Tracker):
    """Logs to ``MLFLOW_TRACKING_URI`` (default: SQLite ``mlflow.db`` in the working directory)."""

    enabled = True

    def __init__(self, experiment: str, execution: Execution | None):
        # Read before set_tracking_uri, which exports MLFLOW_TRACKING_URI to this process.
        self.explicit_uri = "MLFLOW_TRACKING_URI" in os.environ
        self.uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient()
        with server_errors(self.uri):  # the first request of every stage
            self.experiment_id = self._experiment(experiment)
        self.execution = execution
        self.execution_id = execution.id if execution else ""
        self.context_tags = run_context_tags()
        self._datasets: dict[tuple[str, str], PandasDataset] = {}

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:") and not self.explicit_uri:
            location = Path("mlartifacts").resolve().as_uri()  # beside mlflow.db, not in ~/
        return self.client.create_experiment(name, artifact_location=location)

    # -----------------------------------------------------------------------------------------
    # The stage run and the parent run of its execution

    @contextlib.contextmanager
    def run(self, stage: str, tags: dict[str, str] | None = None) -> Iterator[MlflowTracker]:
        """A stage run, the child of its execution's parent run (none for a stage run by hand)."""
        parent = self._open_parent() if self.execution else None
        all_tags = {**self.context_tags, "qualiclip.kind": "stage", "qualiclip.stage": stage, **(tags or {})}
        if self.execution:
            all_tags["qualiclip.execution_id"] = self.execution.id
        status, error = RunStatus.FAILED, None
        try:
            with mlflow.start_run(
                experiment_id=self.experiment_id, run_name=stage, parent_run_id=parent, tags=all_tags
            ) as run:
                self.run_id = run.info.run_id
                try:
                    yield self
                except BaseException as exc:
                    error = f"{stage}: {type(exc).__name__}: {exc}"[:500]
                    mlflow.set_tag(ERROR_TAG, error)
                    raise
            status = RunStatus.FINISHED
        except KeyboardInterrupt:
            status = RunStatus.KILLED
            raise
        finally:
            if parent:
                self._close_parent(parent, status, error)

    def _open_parent(self) -> str:
        """The execution's parent run, created at the first stage and marked running at each."""
        assert self.execution is not None  # called only for a stage run of an execution
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`qualiclip.execution_id` = '{self.execution.id}' and tags.`qualiclip.kind` = 'execution'",
            max_results=1,
        )
        if found:
            run = found[0]
            if run.info.status != "FAILED":  # a failed execution stays failed (dvc repro --keep-going)
                self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        started = self.execution.started or time.time()
        tags = {**self.context_tags, "qualiclip.execution_id": self.execution.id, "qualiclip.kind": "execution"}
        return self.client.create_run(
            self.experiment_id, start_time=int(started * 1000), tags=tags, run_name=self.execution.title(started)
        ).info.run_id

    def _close_parent(self, run_id: str, status: int, error: str | None) -> None:
        """End the parent run now, FAILED if this stage or an earlier one failed.

        The next stage reopens it, so after the last stage it ends when the execution ended.
        """
        failed = self.client.get_run(run_id).info.status == "FAILED" or status == RunStatus.FAILED
        if error:
            self.client.set_tag(run_id, ERROR_TAG, error)
        self.client.set_terminated(run_id, "FAILED" if failed else RunStatus.to_string(status))

    # -----------------------------------------------------------------------------------------
    # What a run logs

    def log_params(self, params: dict[str, Any]) -> None:
        mlflow.log_params({k: ("" if v is None else v) for k, v in flatten(params).items()})

    def log_metrics(
        self,
        metrics: dict[str, Any],
        step: int | None = None,
        *,
        model_id: str | None = None,
        dataset: DatasetRef | None = None,
    ) -> None:
        numbers = {k: float(v) for k, v in flatten(metrics).items() if _is_number(v)}
        if numbers:
            mlflow.log_metrics(
                numbers, step=step, model_id=model_id, dataset=self._dataset(dataset) if dataset else None
            )

    def log_input(self, dataset: DatasetRef, context: str) -> None:
        mlflow.log_input(self._dataset(dataset), context=context)

    def _dataset(self, ref: DatasetRef) -> PandasDataset:
        """The MLflow dataset of ``ref`` (built once per run: its rows become its schema and profile)."""
        key = (ref.name, ref.digest)
        if key not in self._datasets:
            self._datasets[key] = mlflow.data.from_pandas(
                float_columns(pd.DataFrame(list(ref.rows))),
                source=LocalArtifactDatasetSource(ref.source),
                name=ref.name,
                digest=ref.digest,
                targets=ref.targets,
            )
        return self._datasets[key]

    def log_table(self, rows: list[dict], artifact_file: str) -> None:
        mlflow.log_table(pd.DataFrame(rows), artifact_file=artifact_file)

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

    def log_model(
        self, checkpoint_dir: Path, *, register_as: str | None, description: str, tags: dict[str, str]
    ) -> ModelRef:
        """Log the checkpoint as a pyfunc model; register a version carrying ``tags``."""
        from .serving import log_pyfunc  # imports torch and open_clip: only the train stage logs a model

        info = log_pyfunc(checkpoint_dir)
        if not register_as:
            return ModelRef(info.model_id)
        # Registered here rather than by log_model(registered_model_name=...), which prints
        # "Successfully registered model" and "Created version" beside the stage's own line.
        self._ensure_registered(register_as)
        mv = self.client.create_model_version(
            register_as,
            source=f"models:/{info.model_id}",
            run_id=info.run_id,
            tags={k: str(v) for k, v in tags.items()},
            description=description,
            model_id=info.model_id,
        )
        return ModelRef(info.model_id, str(mv.version))

    def _ensure_registered(self, name: str) -> None:
        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code not in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(ALREADY_EXISTS)):
                raise

    def link_model(self, model_id: str) -> bool:
        try:  # the version file beside a checkpoint may name a model of another store
            self.client.get_logged_model(model_id)
        except MlflowException:
            return False
        # A run's model inputs (log_inputs(models=...)) are Databricks-only in MLflow 3.17: a tag,
        # and the metrics logged against the model, link the two.
        mlflow.set_tag(MODEL_TAG, model_id)
        return True


def run_context_tags() -> dict[str, str]:
    """Tags that say which code and which DVC experiment a run belongs to.

    The git commit is HEAD of the DVC project (``DVC_ROOT``, which DVC sets to the project even
    when an experiment runs in a temporary copy), else of the working directory; absent outside
    git. ``dvc exp run`` sets ``DVC_EXP_NAME`` and ``DVC_EXP_BASELINE_REV``; plain ``dvc repro`` does not.
    """
    tags = {"qualiclip.version": __version__}
    commit = get_git_commit(os.environ.get(DVC_ROOT_ENV) or os.getcwd())
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
    tags.update({tag: os.environ[env] for env, tag in DVC_EXP_TAGS.items() if os.environ.get(env)})
    return tags


def float_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its integer columns as float64 (the values unchanged).

    MLflow infers a dataset's schema from its rows and warns on every integer column (an
    integer column cannot hold a missing value); image sizes, levels and counts are numbers
    of a table, not model inputs, so they are logged as the doubles MLflow recommends.
    """
    ints = frame.select_dtypes("integer").columns
    return frame.astype({c: "float64" for c in ints}) if len(ints) else frame


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
    """A client for the project's tracking store and model registry (no global state touched).

    A server is asked once now, so that a refusal its operator must fix is one line (`server_errors`)."""
    uri = tracking_uri(project_dir)
    client = MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI", uri))
    if uri.startswith(("http://", "https://")):
        with server_errors(uri):
            client.search_experiments(max_results=1)
    return client


def download_model(uri: str, project_dir: str | Path = ".") -> tuple[Path, str | None]:
    """The local folder of the MLflow model at ``uri`` and its registered version (None unless a
    ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` URI).

    Resolved with the project's store (`registry_client`): MLflow's own ``models:/`` resolution
    reads only the process-wide registry URI. A URI that names nothing (no such model, no such
    alias: nothing promoted yet) is a `ModelUriError` that says what to do, not a traceback.
    """
    store = tracking_uri(project_dir)
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        # checked before any client exists: opening a SQLite store creates an empty one
        raise ModelUriError(
            f"{uri}: no MLflow store at {store.removeprefix('sqlite:///')} — run `dvc repro` with "
            "tracking on here first, or set MLFLOW_TRACKING_URI to the store that holds the model"
        )
    client = registry_client(project_dir)
    version = None
    try:
        location = uri
        if uri.startswith("models:/"):
            found = get_model_name_and_version(client, uri)  # (name, version), or (model id,)
            if len(found) == 2:
                version = str(found[1])
                location = client.get_model_version_download_uri(found[0], version)
            else:
                location = client.get_logged_model(found[0]).artifact_location
        local = mlflow.artifacts.download_artifacts(location, tracking_uri=store)
    except MlflowException as exc:
        raise ModelUriError(_model_uri_hint(uri, exc, client)) from None
    return Path(local), version


def _model_uri_hint(uri: str, exc: MlflowException, client: MlflowClient) -> str:
    """One line: what ``uri`` lacks in the store of ``client``, and what to run."""
    store, rest = client.tracking_uri, uri.removeprefix("models:/")
    name, _, alias = rest.partition("@")
    name = name.split("/")[0]
    if uri.startswith("models:/") and ("@" in rest or "/" in rest):  # a registered name (a bare id is a logged model)
        if not client.search_registered_models(f"name = '{name}'"):
            return (
                f"{uri}: no registered model '{name}' in {store} — run `dvc repro` with tracking on first "
                "(the train stage registers it), or set MLFLOW_TRACKING_URI to the store that holds it"
            )
        if alias and alias not in client.get_registered_model(name).aliases:
            return (
                f"{uri}: no version of '{name}' has the alias '{alias}' in {store} — nothing promoted yet? "
                f"Run `qualiclip promote` after `dvc repro`, or name a version: --model models:/{name}/1"
            )
    return f"{uri}: {str(exc.message).strip().splitlines()[0]} (store {store})"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
