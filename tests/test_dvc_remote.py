"""A DVC remote on the S3 server (moto, 127.0.0.1): the retraining flow pushes the stage outputs
after its run; a fresh clone pulls them and finds the pipeline up to date."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLEAN_ENV, ROOT, bin_path, make_dvc_project, make_photos, tiny_params

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout + proc.stderr


def commit_step() -> str:
    """The command docs/scale.md §2 gives to commit a reproduced project (issue 27: "commit dvc.lock"
    left a clone with a dirty `dvc status` that would retrain)."""
    text = (ROOT / "docs/scale.md").read_text().split("## 2. DVC remote on S3", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in text.splitlines() if line.startswith("git add ")]
    assert len(lines) == 1, f"docs/scale.md §2 names no single `git add` step: {lines}"
    return lines[0]


def test_retrain_pushes_and_a_fresh_clone_pulls_an_up_to_date_pipeline(tmp_path, s3_server, s3_bucket):
    drop = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL", "PREFECT_PROFILE", "QUALICLIP_PIPELINE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}  # s3_bucket set the AWS_* variables
    env.update(
        CLEAN_ENV,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PYTHONPATH=str(ROOT),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    dvc = bin_path("dvc")
    photos = make_photos(tmp_path / "photos", n=6)
    params = tiny_params([str(photos)])
    params["schedule"] = {"push": True}
    project = make_dvc_project(tmp_path / "project", params, env)
    with open(project / ".gitignore", "a") as f:
        f.write("mlruns/\n.qualiclip.lock\n")
    for cmd in (
        [dvc, "remote", "add", "-d", "storage", f"{s3_bucket}/dvc"],
        [dvc, "remote", "modify", "storage", "endpointurl", s3_server.endpoint],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
    ):
        run(cmd, project, env)

    # one scheduled-retraining run: dvc repro, promote, dvc push (schedule.push: true)
    run([sys.executable, "-m", "flows.retrain", "run", "--project", str(project)], ROOT, env)
    bucket = s3_bucket.removeprefix("s3://")
    assert s3_server.objects(bucket, "dvc/"), "the flow pushed nothing to the remote"
    run(["bash", "-ec", commit_step()], project, env)  # as docs/scale.md says: dvc.lock and what DVC leaves to git
    assert not run(["git", "status", "--porcelain", "--untracked-files=all"], project, env).strip()  # nothing left

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path, env)
    assert not (clone / "outputs/train/checkpoint").exists()
    run([dvc, "pull"], clone, env)
    for path in (
        "data/ingest/manifest.csv",
        "data/shards/index.json",
        "outputs/train/checkpoint/model.safetensors",
        "outputs/eval/synthetic_scores.csv",
    ):
        assert (clone / path).read_bytes() == (project / path).read_bytes(), path
    status = run([dvc, "status"], clone, env)
    assert "Data and pipelines are up to date" in status, status
    repro = run([dvc, "repro"], clone, env)
    assert "Running stage" not in repro and "Data and pipelines are up to date" in repro, repro
