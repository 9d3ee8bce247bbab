"""Real servers on 127.0.0.1 for tests: started by session fixtures, stopped when the session ends.

conftest.py imports the fixtures, so any test module can ask for them:

- ``s3_server``: moto's S3 in server mode (`moto.server.ThreadedMotoServer`, a real HTTP server on
  a free loopback port in a thread of this process). It changes no environment variable; its
  ``env`` holds what a client needs (``AWS_ENDPOINT_URL``, test credentials, region), for this
  process (``s3_bucket`` sets it for one test) and for subprocesses (``{**os.environ, **s3.env}``):
  botocore, s3fs, DVC's S3 remote and MLflow's S3 artifact store all read it.
- ``s3_bucket``: a fresh, empty bucket for one test (``s3://qualiclip-test-N``), with ``s3_server.env``
  set in ``os.environ`` for the test's duration.
- ``dask_cluster``: a `distributed.LocalCluster` of 2 worker processes on 127.0.0.1; connect with its
  ``scheduler_address``.
- ``postgres``: the DSN of a throwaway PostgreSQL cluster (`postgres_cluster`, reusable outside
  pytest too) in a temp folder, on a free loopback port, removed at the end of the session; each
  server takes a database of its own (`new_database`).
- ``mlflow_server``: ``mlflow server`` on 127.0.0.1 with ``postgres`` as its backend store and a
  bucket of ``s3_server`` as its artifact destination, proxying artifacts (`MlflowServer`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_BUCKETS = itertools.count()


@dataclass(frozen=True)
class S3Server:
    """A running S3 server: its endpoint URL and the client environment that points at it."""

    endpoint: str
    env: dict[str, str] = field(default_factory=dict)

    def client(self):
        """A boto3 S3 client of this server (for setup and inspection; the code under test uses fsspec)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )

    def make_bucket(self) -> str:
        """Create a new empty bucket; returns its name."""
        name = f"qualiclip-test-{next(_BUCKETS)}"
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every object under ``prefix`` (name relative to it -> bytes)."""
        client, out = self.client(), {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(prefix) :].lstrip("/")] = client.get_object(Bucket=bucket, Key=obj["Key"])[
                    "Body"
                ].read()
        return out


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        yield S3Server(
            endpoint,
            {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
            },
        )
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """``s3://<a new bucket>``, with the server's client environment set for this test."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return f"s3://{s3_server.make_bucket()}"


@pytest.fixture(scope="session")
def dask_cluster():
    """A `distributed.LocalCluster` of 2 single-threaded worker processes on 127.0.0.1, no dashboard:
    what ``python -m flows.degrade_shards --dask local --workers 2`` starts (`local_cluster_kwargs`)."""
    from distributed import LocalCluster

    from flows.degrade_shards import local_cluster_kwargs

    with LocalCluster(**local_cluster_kwargs(2)) as cluster:
        yield cluster


# ---------------------------------------------------------------------------------------------
# PostgreSQL and the MLflow server on it

PG_BIN = Path(os.environ.get("QUALICLIP_PG_BIN", "/usr/lib/postgresql/15/bin"))  # Debian's postgresql-15
PG_USER = os.environ.get("QUALICLIP_PG_USER", "postgres")  # who runs the cluster when we are root (.ci/run)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the server binding it next is the only race)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_cluster_owner(cmd: list[str]) -> list[str]:
    """``cmd`` as `PG_USER` when this process is root (initdb and postgres refuse root), else as is."""
    return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """A throwaway PostgreSQL cluster: initdb in a temp folder, the server on a free port of
    127.0.0.1 only (its Unix socket in that folder), trust auth for the superuser ``qc``. Yields
    the DSN of its maintenance database (``postgresql://qc@127.0.0.1:PORT/postgres``); give each
    server its own database (`new_database`): MLflow and Prefect both keep an ``alembic_version``
    table. Stops the server and removes the folder on exit. No fsync: the data dies with the test."""
    if not (PG_BIN / "initdb").is_file():
        raise RuntimeError(
            f"no PostgreSQL at {PG_BIN} — apt-get install postgresql-15 (.ci/run does), "
            "or set QUALICLIP_PG_BIN to the folder holding initdb and pg_ctl"
        )
    root = Path(tempfile.mkdtemp(prefix="qualiclip-pg-"))
    data, port = root / "data", free_port()
    if os.geteuid() == 0:
        shutil.chown(root, PG_USER, PG_USER)
    try:
        _run(
            _as_cluster_owner(
                [str(PG_BIN / "initdb"), "-D", str(data), "-U", "qc", "--auth=trust", "--encoding=UTF8", "--no-sync"]
            )
        )
        _run(
            _as_cluster_owner(
                [
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(root / "server.log"),
                    "-w",
                    "-o",
                    f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off",
                    "start",
                ]
            )
        )
        try:
            yield f"postgresql://qc@127.0.0.1:{port}/postgres"
        finally:
            _run(_as_cluster_owner([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def new_database(dsn: str, name: str) -> str:
    """Create the empty database ``name`` in the cluster of ``dsn``; returns its DSN."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return dsn.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """The maintenance DSN of a PostgreSQL cluster for this session (`postgres_cluster`); a server
    takes a database of its own with `new_database`."""
    with postgres_cluster() as dsn:
        yield dsn


@dataclass(frozen=True)
class MlflowServer:
    """A running ``mlflow server``: its URL, its backend store's DSN, and where artifacts land."""

    url: str
    dsn: str
    bucket: str  # the artifacts are objects under s3://<bucket>/<prefix>/
    prefix: str


@pytest.fixture(scope="session")
def mlflow_server(postgres, s3_server, tmp_path_factory) -> Iterator[MlflowServer]:
    """``mlflow server`` on a free port of 127.0.0.1: PostgreSQL backend store, artifacts proxied
    (``--serve-artifacts``, the default) to ``s3://<its own bucket>/mlartifacts``. Only the server
    holds the S3 credentials and endpoint; clients need nothing but the URL."""
    from flows.repro import stop_process_group

    bucket, port, dsn = s3_server.make_bucket(), free_port(), new_database(postgres, "mlflow")
    folder = tmp_path_factory.mktemp("mlflow-server")
    env = {
        **os.environ,
        **s3_server.env,
        "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    # the driver named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, the scale extra installs psycopg2
    store = dsn.replace("postgresql://", "postgresql+psycopg2://", 1)
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        store,
        "--artifacts-destination",
        f"s3://{bucket}/mlartifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "2",
    ]
    proc = start_logged(cmd, folder / "server.log", env, folder)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, folder / "server.log", "mlflow server")
        yield MlflowServer(f"http://127.0.0.1:{port}", dsn, bucket, "mlartifacts")
    finally:
        stop_process_group(proc)


def start_logged(cmd: list[str], log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own (`flows.repro.stop_process_group` stops it with its
    children), its output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_http(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float = 240) -> None:
    """Poll ``url`` until it answers 200 (an MLflow server's first start migrates its database:
    tens of seconds on 2 cores); fail with ``log``'s tail if ``proc`` exits or time runs out."""
    wait_until(lambda: answers(url), what, proc, log, timeout)


def wait_until(ok, what: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll ``ok()`` until true; fail with the process log if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError, ValueError):  # OSError: also urllib's URLError
            if ok():
                return
        time.sleep(1)
    pytest.fail(f"{what} not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status == 200


def http(url: str, payload: dict | None = None, timeout: float = 60) -> dict:
    """GET ``url``, or POST ``payload`` as JSON; the JSON answer."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")
