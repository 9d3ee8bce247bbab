"""The opt-in QualiCLIP+ stage in a real git + DVC project with a real MLflow store: a rated set
named in params.yaml is learnt from after train, the result registered under its own name and
scored by `qualiclip score`, evaluated (its DVC metrics file, MLflow, the summary line), and its
ONNX, official and MLflow pyfunc forms scoring as the library does; changed labels rerun the stage
alone, nothing changed reruns nothing."""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path

import numpy as np
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
    other = {"name": "csv", "root": "other", "image_dir": "images", "mos_range": [0, 100], "lower_is_better": False}
    params["evaluate"]["datasets"] = [{**other, "label": "other"}]  # cross-dataset: evaluate and plus score it
    root = make_dvc_project(tmp_path_factory.mktemp("plus") / "project", params)
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    pipeline["stages"]["plus"]["deps"].append("rated")  # as params.yaml's comment tells a user
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    make_photos(root / "photos", n=6)
    labelled_set(root / "rated", clive_dir, 12)
    labelled_set(root / "other", clive_dir, 5)
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
    assert status["ran"] and set(status["metrics"]) == {"test", "other", "baseline"}
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


def test_the_stage_evaluates_its_model_beside_the_model_it_starts_from_as_dvc_metrics(project):
    """Its test split and every evaluate.datasets entry (here one: `other`), the starting model's
    figures on the same images as `baseline`; `dvc metrics show` lists them, MLflow has them, and
    the summary line says them."""
    metrics = json.loads((project / "outputs/plus_eval/metrics.json").read_text())
    assert set(metrics) == {"test", "other", "baseline"} and set(metrics["baseline"]) == {"test", "other"}
    assert metrics["test"]["n"] == metrics["baseline"]["test"]["n"] == 3 and metrics["other"]["n"] == 5
    shown = json.loads(run([bin_path("dvc"), "metrics", "show", "--json"], project).stdout)
    assert json.dumps(shown).count("outputs/plus_eval/metrics.json") == 1, shown
    t, b = metrics["test"], metrics["baseline"]["test"]
    line = f"test SRCC {t['srcc']:.3f} PLCC {t['plcc']:.3f} (from {b['srcc']:.3f}, {b['plcc']:.3f}); other SRCC"
    assert line in (project / "first_repro.log").read_text()
    with sqlite3.connect(project / "mlflow.db") as db:
        logged = dict(
            db.execute(
                "select m.key, m.value from metrics m join tags t on m.run_uuid = t.run_uuid "
                "where t.key = 'qualiclip.stage' and t.value = 'plus'"
            ).fetchall()
        )
    assert logged["test.srcc"] == pytest.approx(t["srcc"]) and logged["baseline.test.srcc"] == pytest.approx(b["srcc"])
    assert logged["other.plcc"] == pytest.approx(metrics["other"]["plcc"])


def photos_of(project: Path) -> list[Path]:
    return sorted((project / "rated/images").iterdir())[:3]


def library_scores(project: Path, checkpoint: str) -> np.ndarray:
    from qualiclip.scoring import score_images

    return np.asarray(score_images(photos_of(project), project / checkpoint), dtype=float)


def test_the_plus_model_scores_differ_from_the_model_it_starts_from(project):
    """What makes the export tests below about QualiCLIP+: its scores are not the train stage's."""
    plus, base = library_scores(project, "outputs/plus/checkpoint"), library_scores(project, "outputs/train/checkpoint")
    assert np.abs(plus - base).max() > 1e-4, (plus, base)


def test_the_official_form_of_the_plus_model_scores_as_the_library(project, tmp_path):
    from qualiclip.checkpoint import load_checkpoint
    from qualiclip.scoring import score_images

    out = tmp_path / "plus.pth"
    run([bin_path("qualiclip"), "export-official", "--model", "outputs/plus/checkpoint", "--out", str(out)], project)
    official = np.asarray(score_images(photos_of(project), load_checkpoint(out, name="qualiclip-tiny-rn")), float)
    np.testing.assert_allclose(official, library_scores(project, "outputs/plus/checkpoint"), atol=1e-5, rtol=0)


def test_the_onnx_form_of_the_plus_model_scores_as_the_library(project, tmp_path):
    import onnxruntime as ort
    from PIL import Image

    out = tmp_path / "plus.onnx"
    run([bin_path("qualiclip"), "export-onnx", "--model", "outputs/plus/checkpoint", "--out", str(out)], project)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = [np.asarray(Image.open(p).convert("RGB")) for p in photos_of(project)]
    got = [float(session.run(["score"], {"image": im[None]})[0][0]) for im in images]
    np.testing.assert_allclose(got, library_scores(project, "outputs/plus/checkpoint"), atol=1e-5, rtol=0)


def test_the_mlflow_pyfunc_form_of_the_plus_model_scores_as_the_library(project):
    """The version the stage registered, loaded as `mlflow models serve` loads it."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    version = json.loads((project / "outputs/plus/registered_model.json").read_text())["version"]
    location = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_download_uri(
        "qualiclip-plus", version
    )
    served = mlflow.pyfunc.load_model(location)
    images = [base64.b64encode(p.read_bytes()).decode() for p in photos_of(project)]
    answer = served.predict(pd.DataFrame({"image": images}))
    assert list(answer.error) == [None] * len(images)
    np.testing.assert_allclose(list(answer.score), library_scores(project, "outputs/plus/checkpoint"), atol=1e-5)


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
