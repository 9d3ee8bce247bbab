"""The whole pipeline in a real git + DVC repo in a temp folder, with a real MLflow SQLite store."""
from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, bin_path, make_photos, run, tiny_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC project with the product's dvc.yaml and tiny params, reproduced once."""
    root = tmp_path_factory.mktemp("project")
    photos = make_photos(root / "photos", n=6)
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params([str(photos)])))
    (root / ".gitignore").write_text("mlflow.db\nmlartifacts/\nphotos/\n")
    run(["git", "init", "-q"], root)
    run([bin_path("dvc"), "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "init"], root)
    first = run([bin_path("dvc"), "repro"], root)
    (root / "first_repro.log").write_text(first.stdout + first.stderr)
    return root


def mlflow_rows(root: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(root / "mlflow.db") as db:
        return db.execute(sql).fetchall()


def test_repro_produces_every_stage_output(project):
    for path in ["data/ingest/manifest.csv", "data/shards/index.json", "outputs/train/checkpoint/model.safetensors",
                 "outputs/train/train_log.csv", "outputs/eval/metrics.json", "outputs/eval/plots/synthetic_scatter.png"]:
        assert (project / path).is_file(), path
    metrics = json.loads((project / "outputs/eval/metrics.json").read_text())
    assert -1.0 <= metrics["synthetic"]["srcc"] <= 1.0
    per_type = (project / "outputs/eval/per_distortion.csv").read_text().splitlines()
    assert {row.split(",")[0] for row in per_type[1:]} == {"gaussian_blur", "jpeg"}
    assert "baseline" in metrics


def test_second_repro_is_a_no_op(project):
    runs_before = mlflow_rows(project, "select count(*) from runs")[0][0]
    out = run([bin_path("dvc"), "repro"], project)
    text = out.stdout + out.stderr
    assert "Data and pipelines are up to date" in text or text.count("didn't change, skipping") == 4, text
    assert "Running stage" not in text
    assert mlflow_rows(project, "select count(*) from runs")[0][0] == runs_before


def test_mlflow_holds_stage_runs_metrics_and_a_registered_model(project):
    stages = {r[0] for r in mlflow_rows(project, "select value from tags where key = 'qualiclip.stage'")}
    assert stages == {"ingest", "degrade", "train", "evaluate"}
    pipelines = {r[0] for r in mlflow_rows(project, "select value from tags where key = 'qualiclip.pipeline_id'")}
    assert len(pipelines) == 1, "the stage runs of one repro share one pipeline id"
    parents = mlflow_rows(project, "select count(distinct value) from tags where key = 'mlflow.parentRunId'")
    assert parents[0][0] == 1
    keys = {r[0] for r in mlflow_rows(project, "select key from metrics")}
    assert {"synthetic.srcc", "synthetic.plcc", "synthetic.krcc", "train/loss"} <= keys
    versions = mlflow_rows(project, "select name, version from model_versions")
    assert versions and versions[0][0] == "qualiclip"


def test_dvc_metrics_show_prints_the_evaluation_metrics(project):
    out = run([bin_path("dvc"), "metrics", "show", "--json"], project).stdout
    data = json.loads(out)
    flat = json.dumps(data)
    assert "synthetic" in flat and "srcc" in flat


def test_dvc_exp_run_with_a_param_override(project):
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "first run"], project)
    run([bin_path("dvc"), "exp", "run", "-S", "train.steps=2"], project)
    shown = run([bin_path("dvc"), "exp", "show", "--json"], project).stdout
    assert "train.steps" in shown or '"steps": 2' in shown
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["steps"] == 2
