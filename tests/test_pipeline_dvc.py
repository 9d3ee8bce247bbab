"""The whole pipeline in a real git + DVC repo in a temp folder, with a real MLflow SQLite store:
what it produces, and what reruns when photos, code or nothing change."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, add_training_photo, bin_path, make_dvc_project, make_photos, run, tiny_params
from noise import noise_lines

pytestmark = pytest.mark.slow
STAGES = ["ingest", "degrade", "train", "evaluate"]
# the opt-in QualiCLIP+ stage: with no plus.dataset (as here) it records that it skipped, loading no
# torch and logging no run (tests/test_plus_dvc.py runs it with a rated set, and checks its code deps)
OPT_IN = ["plus"]
HOOK = Path(__file__).resolve().parent / "stage_hook"  # sitecustomize.py: what each stage process loads


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A clone-like git + DVC project with tiny params, reproduced once, each stage process
    recording the library files it loads (in stage-log/)."""
    root = make_dvc_project(tmp_path_factory.mktemp("ws") / "project", tiny_params(["photos"]))
    make_photos(root / "photos", n=6)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "init"], root)
    (root / "stage-log").mkdir()
    first = run([bin_path("dvc"), "repro"], root, PYTHONPATH=str(HOOK), QUALICLIP_STAGE_LOG=str(root / "stage-log"))
    (root / "first_repro.log").write_text(first.stdout + first.stderr)
    return root


def repro(project: Path, *args: str) -> list[str]:
    """Run ``dvc repro``; the stages it ran, in order."""
    out = run([bin_path("dvc"), "repro", *args], project)
    return re.findall(r"^Running stage '([\w-]+)'", out.stdout + out.stderr, re.M)


def stale(project: Path) -> set[str]:
    """The stages ``dvc status`` finds changed (their own deps, params or outs)."""
    return set(json.loads(run([bin_path("dvc"), "status", "--json"], project).stdout or "{}"))


def mlflow_rows(root: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(root / "mlflow.db") as db:
        return db.execute(sql).fetchall()


def test_repro_produces_every_stage_output(project):
    for path in [
        "data/ingest/manifest.csv",
        "data/shards/index.json",
        "outputs/train/checkpoint/model.safetensors",
        "outputs/train/train_log.csv",
        "outputs/eval/metrics.json",
        "outputs/eval/plots/synthetic_scatter.png",
        "outputs/plus/status.json",  # the opt-in stage, skipped
        "outputs/plus_eval/metrics.json",  # its metrics file: empty
    ]:
        assert (project / path).is_file(), path
    assert json.loads((project / "outputs/plus_eval/metrics.json").read_text()) == {}
    metrics = json.loads((project / "outputs/eval/metrics.json").read_text())
    assert -1.0 <= metrics["synthetic"]["srcc"] <= 1.0
    per_type = (project / "outputs/eval/per_distortion.csv").read_text().splitlines()
    assert {row.split(",")[0] for row in per_type[1:]} == {"gaussian_blur", "jpeg"}
    assert "baseline" in metrics


def test_the_repro_log_says_what_each_stage_did_without_noise(project):
    """Issue 23: a line per stage saying what it did, numbers rounded, no hint or warning a user
    cannot act on (DVC's closing `dvc push` line, printed once whatever the settings, aside); the
    parent run named for what ran and when; the logged model named for what it is."""
    log = (project / "first_repro.log").read_text()
    assert noise_lines(log, allow=("dvc push hint",)) == [], log
    assert log.count("Use `dvc push`") <= 1
    for stage in STAGES + OPT_IN:
        assert re.search(rf"^{stage}: \S", log, re.M), f"no line of {stage}:\n{log}"
    assert re.search(r"^plus: skipped — no labelled dataset named", log, re.M), log
    assert re.search(
        r"^train: 3 steps in \d+s, final loss \d\.\d{4} \(cons \d\.\d{4}, pos \d\.\d{4}, neg \d\.\d{4}\)$", log, re.M
    ), log
    parents = mlflow_rows(
        project,
        "select r.name from runs r join tags t on r.run_uuid = t.run_uuid "
        "where t.key = 'qualiclip.kind' and t.value = 'execution'",
    )
    named = r"dvc repro( \S+)* \d{4}-\d\d-\d\d \d\d:\d\d:\d\d"  # what ran, and when
    assert parents and all(re.fullmatch(named, n) for (n,) in parents), parents
    assert {n for (n,) in mlflow_rows(project, "select name from logged_models")} == {"qualiclip-tiny-rn"}


def test_each_stage_depends_on_exactly_the_code_it_loads(project):
    """dvc.yaml's code deps of each stage = the library files its process imported or read as data
    in the first repro (the app layer, qualiclip/pipeline/, is none: dvc.yaml's header says why)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    wrong = []
    for stage in STAGES:
        loaded = {
            f
            for f in (project / "stage-log" / f"{stage}.txt").read_text().split()
            if not f.startswith("qualiclip/pipeline/")
        }
        code = [d for d in stages[stage]["deps"] if d.startswith("qualiclip/")]
        missing = sorted(f for f in loaded if not any(f == d or f.startswith(d + "/") for d in code))
        unused = sorted(d for d in code if not any(f == d or f.startswith(d + "/") for f in loaded))
        wrong += [f"stage {stage}: add deps {missing}, remove deps {unused}"] if missing or unused else []
    assert not wrong, "dvc.yaml is out of date:\n" + "\n".join(wrong)
    assert "qualiclip/distortions/registry.py" not in (project / "stage-log/ingest.txt").read_text()


def test_second_repro_is_a_no_op(project):
    runs_before = mlflow_rows(project, "select count(*) from runs")[0][0]
    assert stale(project) == set()
    assert repro(project) == []
    assert mlflow_rows(project, "select count(*) from runs")[0][0] == runs_before


def test_forced_degrade_regenerates_the_shards(project):
    shards = sorted((project / "data/shards").glob("shard-*.tar"))
    written = {p.name: p.stat().st_mtime_ns for p in shards}
    index = (project / "data/shards/index.json").read_bytes()
    out = run([bin_path("dvc"), "repro", "--force", "--single-item", "degrade"], project)  # as the docs say
    assert "(0 resumed)" in out.stdout + out.stderr, out.stdout[-2000:]
    assert re.findall(r"^Running stage '([\w-]+)'", out.stdout + out.stderr, re.M) == ["degrade"]  # not ingest too
    assert all(p.stat().st_mtime_ns != written[p.name] for p in shards), "shards were kept, not regenerated"
    assert (project / "data/shards/index.json").read_bytes() == index  # same code and inputs, same bytes
    assert stale(project) == set()  # so train and evaluate stay valid


def test_a_changed_distortion_reruns_degrade_train_and_evaluate_not_ingest(project):
    """And a changed evaluation detail reruns evaluate (and plus, whose evaluation of its model is
    evaluate.py's code) only: the train stage loads no evaluation code (it checks
    evaluate.datasets with the dataset readers), so it stays up to date."""
    evaluate = project / "qualiclip/evaluate.py"
    evaluate.write_text(evaluate.read_text() + "\n# an evaluation detail changed\n")
    assert stale(project) == {"evaluate", *OPT_IN}
    ops = project / "qualiclip/distortions/_ops.py"
    scale = "alpha=255.0"  # to_uint8: [0, 1] -> 0..255, used for every sample
    assert scale in ops.read_text()
    ops.write_text(ops.read_text().replace(scale, "alpha=254.0"))  # a real change: every shard differs
    assert "ingest" not in stale(project) and "degrade" in stale(project)
    assert repro(project) == ["degrade", "train", "evaluate", *OPT_IN]
    assert stale(project) == set()


def test_an_added_photo_reruns_every_stage(project):
    add_training_photo(project / "photos", tiny_params([])["ingest"]["val_fraction"])
    assert stale(project) == {"ingest"}
    assert repro(project) == STAGES + OPT_IN
    rows = (project / "data/ingest/manifest.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 7 and any(",photos,added-" in r for r in rows)
    assert repro(project) == []


def test_a_source_folder_that_is_no_dependency_is_refused(tmp_path):
    """README: a folder in ingest.sources must also be a dep of the ingest stage, or DVC would
    never see its new photos; the stage refuses to run under DVC without it."""
    root = make_dvc_project(tmp_path / "p", tiny_params(["photos"]), declare_sources=False)
    make_photos(root / "photos", n=2)
    out = run([bin_path("dvc"), "repro", "ingest"], root, check=False)
    assert out.returncode != 0
    assert "ingest.sources lists 'photos', but the 'ingest' stage" in out.stdout + out.stderr
    assert "add '- photos' to that stage's deps" in out.stdout + out.stderr


def test_mlflow_holds_stage_runs_metrics_and_a_registered_model(project):
    stages = {r[0] for r in mlflow_rows(project, "select value from tags where key = 'qualiclip.stage'")}
    assert stages == {"ingest", "degrade", "train", "evaluate"}
    # four repros ran stages above (the first, forced degrade alone, changed distortion, added photo):
    # each is one execution, its stage runs children of one parent run
    rows = mlflow_rows(
        project,
        "select p.value, s.value, r.value from tags p join tags s on p.run_uuid = s.run_uuid "
        "join tags r on p.run_uuid = r.run_uuid where p.key = 'qualiclip.execution_id' "
        "and s.key = 'qualiclip.stage' and r.key = 'mlflow.parentRunId'",
    )
    stages_of, parents_of = {}, {}
    for execution, stage, parent in rows:
        stages_of.setdefault(execution, []).append(stage)
        parents_of.setdefault(execution, set()).add(parent)
    assert len(stages_of) == 4 and all(len(p) == 1 for p in parents_of.values()), (stages_of, parents_of)
    assert len({p for ps in parents_of.values() for p in ps}) == 4
    assert all(len(v) == len(set(v)) for v in stages_of.values()), "one run per stage and execution"
    assert sorted(sorted(v) for v in stages_of.values()) == sorted(
        [
            ["degrade"],
            ["degrade", "evaluate", "train"],
            ["degrade", "evaluate", "ingest", "train"],
            ["degrade", "evaluate", "ingest", "train"],
        ]
    ), stages_of
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
