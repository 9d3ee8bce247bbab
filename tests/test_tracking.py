"""The tracking interface: the no-op default, pipeline ids, and the MLflow store's layout."""
from __future__ import annotations

import subprocess
import sys

import pytest

from qualiclip.pipeline.tracking import PIPELINE_ENV, get_tracker, pipeline_id
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
from qualiclip.pipeline.tracking import get_tracker
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


def test_pipeline_id_from_env_else_params_hash(tmp_path, monkeypatch):
    params = tmp_path / "params.yaml"
    params.write_text("train: {steps: 1}\n")
    monkeypatch.delenv(PIPELINE_ENV, raising=False)
    first = pipeline_id(params)
    assert first.startswith("params-") and first == pipeline_id(params)
    params.write_text("train: {steps: 2}\n")
    assert pipeline_id(params) != first
    monkeypatch.setenv(PIPELINE_ENV, "flow-run-1")
    assert pipeline_id(params) == "flow-run-1"


def test_default_store_keeps_artifacts_beside_mlflow_db(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from qualiclip.pipeline.tracking_mlflow import MlflowTracker, tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(experiment="qualiclip", pipeline="p1")
    try:
        location = tracker.client.get_experiment(tracker.experiment_id).artifact_location
        assert location == (tmp_path / "mlartifacts").as_uri()
        with tracker.run("ingest"):
            tracker.log_metrics({"ingest": {"accepted": 3}})
        run = tracker.client.get_run(tracker.run_id)
        assert run.data.metrics == {"ingest.accepted": 3.0}
        assert run.data.tags["qualiclip.pipeline_id"] == "p1" and "mlflow.parentRunId" in run.data.tags
    finally:
        import mlflow

        mlflow.set_tracking_uri(None)  # set_tracking_uri exported the URI; keep other tests clean
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
