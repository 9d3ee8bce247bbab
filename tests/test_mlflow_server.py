"""A shared MLflow server (issue 17 item 3): ``mlflow server`` on 127.0.0.1 with a PostgreSQL
backend store and an S3 bucket (moto) as its proxied artifact destination (tests/servers.py).

The pipeline's processes get only ``MLFLOW_TRACKING_URI``: no S3 credentials, no local store.
Runs and registered versions must land in PostgreSQL, the model's files in the bucket, the
``champion`` alias must move through the server, and ``mlflow models serve`` must load the champion
through it and score as the library does."""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg2
import pytest
from conftest import bin_path, make_dvc_project, make_photos, promoting_params, run
from servers import free_port, http, start_logged, wait_http

from flows.repro import stop_process_group

pytestmark = pytest.mark.slow

PARAMS = promoting_params()
ARTIFACTS = "outputs/train/checkpoint"


def query(dsn: str, sql: str, *args) -> list[tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        rows = cur.fetchall()
    conn.close()
    return rows


def object_keys(s3_server, bucket: str, prefix: str) -> list[str]:
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.fixture
def project(tmp_path, mlflow_server, monkeypatch) -> Path:
    """The tiny pipeline reproduced and promoted with nothing but the server's URL."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)  # the clients hold no S3 credentials: artifacts go through the server
    project = make_dvc_project(tmp_path / "project", PARAMS)
    make_photos(project / "photos", n=6)
    run([bin_path("dvc"), "repro"], project, MLFLOW_TRACKING_URI=mlflow_server.url)
    return project


def test_runs_models_and_the_champion_live_on_the_server(project, mlflow_server, s3_server):
    promote = run([bin_path("qualiclip"), "promote", "--json"], project, MLFLOW_TRACKING_URI=mlflow_server.url)
    decision = json.loads(promote.stdout)
    registered = json.loads((project / "outputs/train/registered_model.json").read_text())
    assert decision["outcome"] == "promoted" and decision["version"] == registered["version"], decision
    assert decision["tracking_uri"] == mlflow_server.url
    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()  # nothing local

    elsewhere = run(
        [bin_path("qualiclip"), "promote"],
        project,
        check=False,
        MLFLOW_TRACKING_URI=f"sqlite:///{project.parent / 'other.db'}",
    )  # not the store train used
    assert elsewhere.returncode == 2 and "Traceback" not in elsewhere.stderr, elsewhere.stderr
    assert f"holds no version {registered['version']} of 'qualiclip'" in elsewhere.stderr, elsewhere.stderr

    dsn = mlflow_server.dsn
    stages = query(
        dsn,
        "SELECT t.value, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE t.key = 'qualiclip.stage'",
    )
    assert sorted(stages) == [(s, "FINISHED") for s in ("degrade", "evaluate", "ingest", "train")]
    assert query(dsn, "SELECT version FROM model_versions WHERE name = 'qualiclip'") == [(int(registered["version"]),)]
    champion = query(
        dsn, "SELECT version FROM registered_model_aliases WHERE name = 'qualiclip' AND alias = 'champion'"
    )
    assert champion == [(int(registered["version"]),)]

    keys = object_keys(s3_server, mlflow_server.bucket, mlflow_server.prefix)
    weights = [k for k in keys if k.endswith("/checkpoint/model.safetensors")]
    assert len(weights) == 1 and any(k.endswith("/MLmodel") for k in keys), keys
    stored = s3_server.client().get_object(Bucket=mlflow_server.bucket, Key=weights[0])["Body"].read()
    assert stored == (project / ARTIFACTS / "model.safetensors").read_bytes()

    photos = sorted((project / "photos").iterdir())[:3]
    with serving_champion(project.parent, mlflow_server.url) as url:
        rows = http(
            url + "/invocations",
            {"dataframe_records": [{"image": base64.b64encode(p.read_bytes()).decode()} for p in photos]},
            timeout=120,
        )["predictions"]
    from qualiclip.scoring import score_images

    np.testing.assert_allclose([r["score"] for r in rows], score_images(photos, project / ARTIFACTS), atol=1e-5)


@contextlib.contextmanager
def serving_champion(tmp: Path, tracking_uri: str) -> Iterator[str]:
    """``mlflow models serve -m models:/qualiclip@champion`` from a folder other than the project,
    with nothing but the tracking URI (the model can only come through the server); its URL."""
    elsewhere, port = tmp / "elsewhere", free_port()
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_TRACKING"))}
    env.update(
        MLFLOW_TRACKING_URI=tracking_uri,
        MLFLOW_DISABLE_TELEMETRY="true",
        PATH=f"{Path(bin_path('mlflow')).parent}{os.pathsep}{env.get('PATH', '')}",
    )  # its uvicorn
    cmd = [
        bin_path("mlflow"),
        "models",
        "serve",
        "-m",
        "models:/qualiclip@champion",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    proc = start_logged(cmd, tmp / "models-serve.log", env, elsewhere)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, tmp / "models-serve.log", "mlflow models serve")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc)
