"""MLflow lineage a reviewer can follow, in a real git + DVC project with a real SQLite store.

One module fixture runs four pipeline executions on tiny params, as a user would:

1. ``dvc repro`` — every stage;
2. ``dvc repro --force --single-item evaluate`` — same params, evaluate only: a new execution;
3. ``dvc repro`` with an unknown distortion in ``evaluate`` — the evaluate stage fails;
4. ``dvc exp run -n lineage-exp -S evaluate.batch_size=8`` after a commit — evaluate again, as an experiment;

then ``qualiclip promote``. The tests read the store, the registry and the served model.
"""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import bin_path, make_dvc_project, make_photos, run, tiny_params

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow")

EXPERIMENT = "lineage-exp"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("lineage")
    params = tiny_params(
        ["photos"],
        evaluate__datasets=[
            {"name": "csv", "root": "rated", "mos_range": [1, 5], "lower_is_better": False, "label": "rated"}
        ],
    )
    root = make_dvc_project(base / "project", params)
    photos = make_photos(root / "photos", n=4)
    rated = make_photos(root / "rated", n=5, seed=1)
    (rated / "labels.csv").write_text(
        "image,mos\n" + "".join(f"photo_{i:02d}.png,{m}\n" for i, m in enumerate([2, 4.5, 3, 1.5, 4]))
    )
    (root / ".gitignore").write_text("mlflow.db\nmlartifacts/\nphotos/\nrated/\n")
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        run(cmd, root)
    first_commit = run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    logs = [run([bin_path("dvc"), "repro"], root)]
    logs.append(run([bin_path("dvc"), "repro", "--force", "--single-item", "evaluate"], root))
    broken = {**params, "evaluate": {**params["evaluate"], "distortions": ["no_such_type"]}}
    (root / "params.yaml").write_text(yaml.safe_dump(broken))
    logs.append(run([bin_path("dvc"), "repro"], root, check=False))
    assert logs[-1].returncode != 0, "the broken evaluate stage did not fail"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "first runs"], root)
    exp_commit = run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    logs.append(run([bin_path("dvc"), "exp", "run", "-n", EXPERIMENT, "-S", "evaluate.batch_size=8"], root))
    promoted = run([bin_path("qualiclip"), "promote"], root, check=False)
    assert promoted.returncode == 3, promoted.stderr  # this 3-step model is refused: exit 3, no error
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    return {
        "root": root,
        "client": client,
        "uri": uri,
        "logs": logs,
        "commits": (first_commit, exp_commit),
        "photos": sorted(photos.glob("*.png")),
    }


def all_runs(project) -> list:
    client = project["client"]
    exp = client.get_experiment_by_name("qualiclip")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def executions(project) -> list[tuple]:
    """(parent run, its stage runs in start order) per execution, in start order."""
    runs = all_runs(project)
    parents = [r for r in runs if r.data.tags.get("qualiclip.kind") == "execution"]
    return [(p, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]) for p in parents]


def stage_runs(project, stage: str) -> list:
    return [r for r in all_runs(project) if r.data.tags.get("qualiclip.stage") == stage]


def stages(children) -> list[str]:
    return [r.data.tags["qualiclip.stage"] for r in children]


def test_one_parent_run_per_execution_that_lasts_as_long_as_its_stages(project):
    found = executions(project)
    assert [stages(children) for _, children in found] == [
        ["ingest", "degrade", "train", "evaluate"],
        ["evaluate"],
        ["evaluate"],
        ["evaluate"],
    ]
    assert len({p.data.tags["qualiclip.execution_id"] for p, _ in found}) == 4
    for parent, children in found:
        assert parent.info.start_time <= min(c.info.start_time for c in children)
        assert parent.info.end_time >= max(c.info.end_time for c in children)
        assert {c.data.tags["qualiclip.execution_id"] for c in children} == {parent.data.tags["qualiclip.execution_id"]}
    first, children = found[0]
    assert first.info.end_time - first.info.start_time >= sum(c.info.end_time - c.info.start_time for c in children)


def test_a_failed_stage_fails_its_execution_with_the_reason(project):
    statuses = [(p.info.status, [c.info.status for c in children]) for p, children in executions(project)]
    assert statuses == [
        ("FINISHED", ["FINISHED"] * 4),
        ("FINISHED", ["FINISHED"]),
        ("FAILED", ["FAILED"]),
        ("FINISHED", ["FINISHED"]),
    ]
    parent, (evaluate,) = executions(project)[2]
    for run_ in (parent, evaluate):
        assert "no_such_type" in run_.data.tags["qualiclip.error"]
        assert run_.data.tags["qualiclip.error"].startswith("evaluate: ")


def test_runs_carry_the_git_commit_and_the_dvc_experiment(project):
    first_commit, exp_commit = project["commits"]
    found = executions(project)
    for parent, children in found[:3]:
        for r in (parent, *children):
            assert r.data.tags["mlflow.source.git.commit"] == first_commit
            assert "dvc.exp_name" not in r.data.tags
    parent, (evaluate,) = found[3]
    for r in (parent, evaluate):
        assert r.data.tags["dvc.exp_name"] == EXPERIMENT
        assert r.data.tags["dvc.exp_baseline_rev"] == exp_commit


def test_each_stage_logs_the_datasets_it_consumes_with_their_digests(project):
    from qualiclip.datasets import check_datasets
    from qualiclip.ingest import read_manifest
    from qualiclip.pipeline.lineage import iqa_input, rows_digest
    from qualiclip.schema import EvaluateConfig
    from qualiclip.shards import data_version

    root = project["root"]

    def inputs(stage: str) -> dict:
        run_ = stage_runs(project, stage)[0]
        return {d.dataset.name: (d.dataset.digest, [t.value for t in d.tags]) for d in run_.inputs.dataset_inputs}

    assert inputs("degrade") == {
        "ingest-train": (rows_digest(read_manifest(root / "data/ingest", "train")), ["training"])
    }
    version = data_version(root / "data/shards")
    assert inputs("train") == {"shards": (version, ["training"])}
    with contextlib.chdir(root):  # the dataset's root is relative to the project, as the stage reads it
        rated = iqa_input(
            "rated",
            check_datasets(
                EvaluateConfig(
                    datasets=tuple(yaml.safe_load((root / "params.yaml").read_text())["evaluate"]["datasets"])
                )
            )[0][1],
        )
    assert inputs("evaluate") == {
        "ingest-val": (rows_digest(read_manifest(root / "data/ingest", "val")), ["evaluation"]),
        "rated": (rated.digest, ["evaluation"]),
    }
    assert inputs("ingest") == {}


def test_data_version_means_the_shard_index_hash_everywhere(project):
    from qualiclip.shards import data_version

    root, client = project["root"], project["client"]
    version = data_version(root / "data/shards")
    meta = json.loads((root / "outputs/train/checkpoint/metadata.json").read_text())
    train = stage_runs(project, "train")[0]
    tags = client.get_model_version("qualiclip", "1").tags
    assert meta["data_version"] == train.data.tags["qualiclip.data_version"] == tags["data_version"] == version
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["degrade"]["outs"] if o["path"] == "data/shards")
    assert tags["dvc_shards_md5"] == md5.removesuffix(".dir") != version


def test_evaluation_metrics_are_logged_against_the_trained_model(project):
    root, client = project["root"], project["client"]
    info = json.loads((root / "outputs/train/registered_model.json").read_text())
    model = client.get_logged_model(info["model_id"])
    assert model.source_run_id == info["run_id"] == stage_runs(project, "train")[0].info.run_id
    evaluations = [r for r in stage_runs(project, "evaluate") if r.info.status == "FINISHED"]
    assert {m.run_id for m in model.metrics} == {r.info.run_id for r in evaluations}  # every one, the failed aside
    evaluate = evaluations[0]
    on_model = {m.key: (m.value, m.dataset_name) for m in model.metrics if m.run_id == evaluate.info.run_id}
    assert on_model["synthetic.srcc"] == (evaluate.data.metrics["synthetic.srcc"], "ingest-val")
    assert on_model["rated.srcc"] == (evaluate.data.metrics["rated.srcc"], "rated")  # each on its own data
    assert not any(k.startswith("baseline.") for k in on_model)  # the baseline is not this model
    assert evaluate.data.tags["qualiclip.model_id"] == info["model_id"]
    ckpt_model = json.loads((root / "outputs/train/checkpoint/config.json").read_text())["model"]
    assert {k: evaluate.data.params[f"model.{k}"] for k in ckpt_model} == {
        k: "" if v is None else str(v) for k, v in ckpt_model.items()
    }


def test_headline_metrics_only_in_metrics_json_mlflow_and_the_registry(project):
    from qualiclip.pipeline.promotion import flat_metrics

    root, client = project["root"], project["client"]
    headline = flat_metrics(json.loads((root / "outputs/eval/metrics.json").read_text()))
    assert headline and not any("per_distortion" in k for k in headline)
    evaluate = stage_runs(project, "evaluate")[-1]
    assert set(evaluate.data.metrics) == set(headline)
    table = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=evaluate.info.run_id, artifact_path="per_distortion.json", tracking_uri=project["uri"]
            )
        ).read_text()
    )
    assert set(table["columns"]) == {"distortion", "srcc", "srcc_within", "baseline_srcc", "baseline_srcc_within"}
    assert sorted(row[0] for row in table["data"]) == ["gaussian_blur", "jpeg"]
    tags = client.get_model_version("qualiclip", "1").tags
    assert {k.removeprefix("eval.") for k in tags if k.startswith("eval.")} == set(headline)
    shown = (
        run([bin_path("dvc"), "exp", "show", "--json"], root).stdout
        + run([bin_path("dvc"), "metrics", "show"], root).stdout
    )
    assert "srcc_within" in shown and "per_distortion" not in shown


def test_the_logged_model_is_code_with_a_signature_and_an_input_example(project, served):
    from mlflow.models import Model

    log = project["logs"][0].stdout + project["logs"][0].stderr
    assert "CloudPickle" not in log and "Add type hints" not in log
    local = Path(
        mlflow.artifacts.download_artifacts(project["client"].get_model_version_download_uri("qualiclip", "1"))
    )
    logged = Model.load(local)
    assert not list(local.rglob("*.pkl")) and "model_code_path" in logged.flavors["python_function"]
    assert [(c.name, c.required) for c in logged.signature.inputs.inputs] == [("image", False), ("path", False)]
    assert [c.name for c in logged.signature.outputs.inputs] == ["score", "error"]
    example = logged.load_input_example(local)
    answer = served.predict(example)
    assert 0 <= answer.score[0] <= 1 and answer.error[0] is None


@pytest.fixture(scope="module")
def served(project):
    """Version 1 loaded as `mlflow models serve` loads it (its file location: no process-wide store set)."""
    return mlflow.pyfunc.load_model(project["client"].get_model_version_download_uri("qualiclip", "1"))


def test_the_served_model_scores_good_rows_and_names_what_is_wrong_with_bad_ones(project, served, monkeypatch):
    from mlflow.exceptions import MlflowException

    from qualiclip.scoring import score_images

    model, photos = served, project["photos"][:2]
    expected = score_images(photos, project["root"] / "outputs/train/checkpoint")
    images = [base64.b64encode(p.read_bytes()).decode() for p in photos]
    answer = model.predict(
        pd.DataFrame({"image": [images[0], "%%% not base64", base64.b64encode(b"text").decode(), images[1]]})
    )
    assert list(answer.columns) == ["score", "error"]
    np.testing.assert_allclose([answer.score[0], answer.score[3]], expected, atol=1e-5)
    assert answer.error[0] is None and answer.score[1] is None and answer.score[2] is None
    assert answer.error[1] == "row 1: not base64" and answer.error[2].startswith("row 2: not_an_image")
    with pytest.raises(MlflowException, match="the 'path' column is off on this server.*QUALICLIP_SERVE_ROOT"):
        model.predict(pd.DataFrame({"path": [str(photos[0])]}))  # no root: the server reads no files
    monkeypatch.setenv("QUALICLIP_SERVE_ROOT", str(photos[0].parent))
    by_path = model.predict(
        pd.DataFrame({"path": [str(photos[0]), photos[1].name, "gone.png", "../params.yaml", "/etc/passwd"]})
    )
    assert list(by_path.score[:2]) == pytest.approx(expected, abs=1e-5) and "unreadable" in by_path.error[2]
    assert by_path.error[3] == "row 3: '../params.yaml' is outside QUALICLIP_SERVE_ROOT" and by_path.score[3] is None
    assert by_path.error[4] == "row 4: '/etc/passwd' is outside QUALICLIP_SERVE_ROOT"
    for bad in (pd.DataFrame({"img": images}), pd.DataFrame({"image": images, "path": [str(p) for p in photos]})):
        with pytest.raises(MlflowException, match=r"needs one input column, 'image' .* or 'path'"):
            model.predict(bad)


def test_score_output_names_the_model_version_range_and_direction(project, monkeypatch, capsys):
    from qualiclip.pipeline.cli import main

    monkeypatch.chdir(project["root"])
    out = project["root"] / "scores.json"
    # a version URI: this 3-step model does not pass the promotion gate (test_ops_prefect scores a champion)
    assert (
        main(["score", str(project["photos"][0]), "--model", "models:/qualiclip/1", "--out", str(out), "--no-progress"])
        == 0
    ), capsys.readouterr().err
    scored = json.loads(out.read_text())
    assert {k: scored[k] for k in ("model", "model_version", "score_min", "score_max", "higher_is_better")} == {
        "model": "models:/qualiclip/1",
        "model_version": "1",
        "score_min": 0.0,
        "score_max": 1.0,
        "higher_is_better": True,
    }
    assert len(scored["scores"]) == 1 and 0 <= scored["scores"][0]["score"] <= 1
