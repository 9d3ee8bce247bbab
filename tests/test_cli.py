"""The stage entries exactly as dvc.yaml calls them: bad arguments give clear errors, exit 2."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import CLEAN_ENV, bin_path, make_photos, tiny_params


def qualiclip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **CLEAN_ENV}
    return subprocess.run([bin_path("qualiclip"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def project(tmp_path) -> Path:
    photos = make_photos(tmp_path / "photos", n=3)
    params = tiny_params([str(photos)], tracking__backend="none")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_unknown_params_key_is_named(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ingest"]["min_sise"] = 10
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = qualiclip("ingest", "--params", "params.yaml", "--out", "data/ingest", cwd=project)
    assert proc.returncode == 2
    assert "unknown key 'min_sise' in params section 'ingest' — did you mean 'min_size'?" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["degrade", "--ingest", "nowhere", "--out", "data/shards"], "run the ingest stage first"),
        (["train", "--shards", "nowhere", "--out", "outputs/train"], "run the degrade stage first"),
        (["evaluate", "--model", "nowhere", "--ingest", "nowhere", "--out", "o"], "run the train stage first"),
        (["ingest", "--params", "missing.yaml", "--out", "data/ingest"], "params file missing.yaml not found"),
    ],
)
def test_missing_upstream_output_names_the_stage_to_run(project, args, message):
    proc = qualiclip(*args, cwd=project)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_required_argument_is_an_argparse_error(project):
    proc = qualiclip("degrade", "--out", "x", cwd=project)
    assert proc.returncode == 2
    assert "--ingest" in proc.stderr


def test_distortions_list_prints_every_type_with_its_group(project):
    proc = qualiclip("distortions", "--list", cwd=project)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert len(rows) == 24 and all(len(r) == 2 for r in rows)
    assert ["gaussian_blur", "blur"] in rows


def test_module_entry_is_the_same_command(project):
    """``python -m qualiclip.pipeline.cli`` (what torchrun runs) is the ``qualiclip`` command."""
    import sys

    proc = subprocess.run([sys.executable, "-m", "qualiclip.pipeline.cli", "distortions", "--list"], cwd=project,
                          env={**os.environ, **CLEAN_ENV}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == qualiclip("distortions", "--list", cwd=project).stdout


def test_stage_entries_run_in_order_as_dvc_calls_them(project):
    for args in (["ingest", "--params", "params.yaml", "--out", "data/ingest"],
                 ["degrade", "--params", "params.yaml", "--ingest", "data/ingest", "--out", "data/shards"]):
        proc = qualiclip(*args, cwd=project)
        assert proc.returncode == 0, proc.stderr
    assert (project / "data/shards/index.json").is_file()
    assert "samples in" in proc.stdout


def test_every_user_error_is_one_line_without_traceback(monkeypatch, capsys):
    """The CLI recognises user errors by their base class, so a new error type needs no registration."""
    from qualiclip.pipeline import cli
    from qualiclip.errors import QualiclipError

    class BrandNewError(QualiclipError):
        pass

    def fail(args):
        raise BrandNewError("shards.tar is torn — rerun the degrade stage")

    monkeypatch.setattr(cli, "cmd_distortions", fail)
    assert cli.main(["distortions", "--list"]) == 2
    assert capsys.readouterr().err == "qualiclip distortions: error: shards.tar is torn — rerun the degrade stage\n"


def test_evaluate_without_held_out_images_names_the_fix(project):
    """An ingest output with no 'val' image is a user error (one line, exit 2), not a traceback."""
    from qualiclip.checkpoint import save_checkpoint
    from qualiclip.model import ModelConfig, create_model

    save_checkpoint(create_model(ModelConfig()), project / "checkpoint")
    (project / "ingest").mkdir()
    (project / "ingest" / "manifest.csv").write_text("id,split\nab12,train\n")
    proc = qualiclip("evaluate", "--model", "checkpoint", "--ingest", "ingest", "--out", "eval", cwd=project)
    assert proc.returncode == 2, proc.stderr
    assert "no 'val' images in ingest/manifest.csv — ingest more photos or lower ingest.val_fraction" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_fails_before_training_when_an_evaluate_dataset_is_broken(project):
    from qualiclip.config import build_config
    from qualiclip.degrade import DegradeConfig, run_degrade
    from qualiclip.ingest import IngestConfig, run_ingest

    params = yaml.safe_load((project / "params.yaml").read_text())
    run_ingest(IngestConfig(sources=(str(project / "photos"),), min_size=64, val_fraction=0.0, workers=1),
               project / "data/ingest", progress=False)
    run_degrade(build_config(DegradeConfig, params["degrade"], where="degrade"), project / "data/ingest",
                project / "data/shards", progress=False)
    rated = make_photos(project / "rated", n=3)
    (rated / "labels.csv").write_text("image,mos\nphoto_00.png,3.0\nphoto_01.png,4.0\n")  # photo_02.png: no label
    params["evaluate"]["datasets"] = [{"name": "csv", "root": str(rated), "mos_range": [1, 5], "lower_is_better": False}]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = qualiclip("train", "--shards", "data/shards", "--out", "outputs/train", cwd=project)
    assert proc.returncode == 2, proc.stderr
    assert "dataset 'csv'" in proc.stderr and "image without a label" in proc.stderr and "photo_02.png" in proc.stderr
    assert "Traceback" not in proc.stderr and not (project / "outputs/train").exists()
