"""The tracking interface: the no-op default, pipeline ids, and the MLflow store's layout."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qualiclip.pipeline.execution import DVC_ROOT_ENV, EXECUTION_ENV, Execution, current_execution
from qualiclip.pipeline.tracking_config import get_tracker
from qualiclip.tracking import Tracker

BLOCK_ORCHESTRATION = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'mlflow', 'prefect', 'dvc'}:
            raise ImportError(f'{name} blocked for this test')
sys.meta_path.insert(0, Block())
import qualiclip.pipeline.stages, qualiclip.pipeline.promotion, qualiclip.scoring, qualiclip.checkpoint
import qualiclip.pipeline.cli, qualiclip.pipeline.score_cli, qualiclip.pipeline.explain_cli
from qualiclip.errors import QualiclipError
from qualiclip.pipeline.tracking_config import get_tracker
from qualiclip.tracking import Tracker
assert type(get_tracker('auto')) is Tracker
try:
    get_tracker('mlflow')
except QualiclipError as exc:
    assert 'not installed' in str(exc)
else:
    raise SystemExit('mlflow backend did not fail')
print('ok')
"""


@pytest.mark.slow
def test_library_imports_and_tracks_nothing_without_mlflow_prefect_dvc():
    out = subprocess.run([sys.executable, "-c", BLOCK_ORCHESTRATION], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_noop_tracker_accepts_every_call(tmp_path):
    t = get_tracker("none")
    assert type(t) is Tracker and not t.enabled
    with t.run("train", tags={"a": "b"}) as r:
        r.log_params({"x": 1})
        r.log_metrics({"m": 1.0}, step=0)
        r.log_artifact(tmp_path)
        assert r.log_model(tmp_path, register_as="m", description="", tags={}) is None


def test_flatten_nests_with_dots_and_stringifies_lists():
    pytest.importorskip("mlflow")
    from qualiclip.pipeline.tracking_mlflow import flatten

    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2]}) == {"a.b": 1, "a.c.d": None, "e": "[1, 2]"}


def test_execution_from_env_else_none_outside_dvc(monkeypatch):
    """The flows name the execution; a stage run by hand (no DVC_ROOT) belongs to none."""
    monkeypatch.delenv(DVC_ROOT_ENV, raising=False)
    monkeypatch.setenv(EXECUTION_ENV, "flow-run-1")
    assert current_execution() == Execution("flow-run-1")
    monkeypatch.delenv(EXECUTION_ENV)
    assert current_execution() is None


@pytest.mark.slow
def test_default_store_keeps_artifacts_beside_mlflow_db(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from qualiclip.pipeline.tracking_mlflow import MlflowTracker, tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(experiment="qualiclip", execution=Execution("p1"))
    try:
        location = tracker.client.get_experiment(tracker.experiment_id).artifact_location
        assert location == (tmp_path / "mlartifacts").as_uri()
        with tracker.run("ingest"):
            tracker.log_metrics({"ingest": {"accepted": 3}})
        run = tracker.client.get_run(tracker.run_id)
        assert run.data.metrics == {"ingest.accepted": 3.0}
        assert run.data.tags["qualiclip.execution_id"] == "p1" and "mlflow.parentRunId" in run.data.tags
    finally:
        import mlflow

        mlflow.set_tracking_uri(None)  # set_tracking_uri exported the URI; keep other tests clean
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.mark.slow
def test_a_registry_uri_that_names_nothing_is_a_one_line_hint(tmp_path, monkeypatch, capsys):
    """``models:/qualiclip@champion`` before any promotion: exit 2 and one line that says what to run."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient
    from PIL import Image

    from qualiclip.pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")

    def score(model: str) -> str:
        assert main(["score", "a.png", "--model", model, "--out", "s.csv", "--no-progress"]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if " INFO mlflow" not in line]  # store set-up
        assert len(lines) == 1 and lines[0].startswith("qualiclip score: error: models:/qualiclip")
        return lines[0]

    assert "no MLflow store at" in score("models:/qualiclip@champion")
    assert not (tmp_path / "mlflow.db").exists()  # not created by looking
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_registered_models()  # creates the store's tables
    assert "no registered model 'qualiclip'" in score("models:/qualiclip@champion")
    client.create_registered_model("qualiclip")
    client.create_model_version("qualiclip", source=str(tmp_path))
    err = score("models:/qualiclip@champion")
    assert "no version of 'qualiclip' has the alias 'champion'" in err and "qualiclip promote" in err
    assert "not found" in score("models:/qualiclip/7")
