"""The opt-in QualiCLIP+ stage in a real git + DVC project with a real MLflow store: a rated set
named in params.yaml is learnt from after train, the result registered under its own name and
scored by `qualiclip score`; changed labels rerun the stage alone, nothing changed reruns nothing."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, bin_path, make_dvc_project, make_photos, run, tiny_params
from test_pipeline_dvc import HOOK, repro, stale
from test_plus import labelled_set

pytestmark = pytest.mark.slow
PLUS = {
    "dataset": {
        "name": "csv",
        "root": "rated",
        "image_dir": "images",
        "mos_range": [0, 100],
        "lower_is_better": False,
    },
    "epochs": 2,
    "batch_size": 4,
    "crop": 64,
    "cached_crops": 1,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory, clive_dir) -> Path:
    params = tiny_params(["photos"])
    params["plus"] = PLUS
    root = make_dvc_project(tmp_path_factory.mktemp("plus") / "project", params)
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    pipeline["stages"]["plus"]["deps"].append("rated")  # as params.yaml's comment tells a user
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    make_photos(root / "photos", n=6)
    labelled_set(root / "rated", clive_dir, 12)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "init"], root)
    (root / "stage-log").mkdir()
    first = run([bin_path("dvc"), "repro"], root, PYTHONPATH=str(HOOK), QUALICLIP_STAGE_LOG=str(root / "stage-log"))
    (root / "first_repro.log").write_text(first.stdout + first.stderr)
    return root


def test_the_stage_learns_from_the_named_set_and_registers_its_own_model(project):
    log = (project / "first_repro.log").read_text()
    assert "plus: 2 epochs on 8 images, test SRCC" in log, log[-3000:]
    status = json.loads((project / "outputs/plus/status.json").read_text())
    assert status["ran"] and set(status["test"]) == {"plus", "base"}
    splits = json.loads((project / "outputs/plus/splits.json").read_text())["splits"]
    assert [splits[k]["n"] for k in ("train", "val", "test")] == [8, 1, 3]
    with sqlite3.connect(project / "mlflow.db") as db:
        names = {r[0] for r in db.execute("select name from model_versions")}
        stages = {r[0] for r in db.execute("select value from tags where key = 'qualiclip.stage'")}
    assert {"qualiclip", "qualiclip-plus"} <= names and "plus" in stages
    registered = json.loads((project / "outputs/plus/registered_model.json").read_text())
    assert registered["name"] == "qualiclip-plus" and registered["version"]
    out = run(
        [bin_path("qualiclip"), "score", "rated/images", "--model", "outputs/plus/checkpoint", "--out", "s.csv"],
        project,
    )
    rows = (project / "s.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 12, out.stdout + out.stderr


def test_the_stage_depends_on_exactly_the_code_it_loads(project):
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["plus"]
    loaded = {
        f for f in (project / "stage-log/plus.txt").read_text().split() if not f.startswith("qualiclip/pipeline/")
    }
    code = [d for d in stage["deps"] if d.startswith("qualiclip/")]
    missing = sorted(f for f in loaded if not any(f == d or f.startswith(d + "/") for d in code))
    unused = sorted(d for d in code if not any(f == d or f.startswith(d + "/") for f in loaded))
    assert not missing and not unused, f"dvc.yaml's plus stage: add deps {missing}, remove deps {unused}"


def test_nothing_changed_reruns_nothing(project):
    assert stale(project) == set()
    assert repro(project) == []


def test_changed_labels_rerun_the_plus_stage_alone(project):
    labels = project / "rated/labels.csv"
    lines = labels.read_text().splitlines()
    name, _ = lines[1].split(",", 1)
    lines[1] = f"{name},99.5"
    before = (project / "outputs/plus/splits.json").read_text()
    labels.write_text("\n".join(lines) + "\n")
    assert stale(project) == {"plus"}
    assert repro(project) == ["plus"]
    assert (project / "outputs/plus/splits.json").read_text() != before  # the digests record the labels
    assert repro(project) == []
