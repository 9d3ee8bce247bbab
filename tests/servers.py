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
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Iterator

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

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
                            region_name=self.env["AWS_DEFAULT_REGION"])

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
                out[obj["Key"][len(prefix):].lstrip("/")] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
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
        yield S3Server(endpoint, {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                                  "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
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
    what ``python -m flows.degrade_flow --dask local --workers 2`` starts (`local_cluster_kwargs`)."""
    from distributed import LocalCluster

    from flows.degrade_flow import local_cluster_kwargs

    with LocalCluster(**local_cluster_kwargs(2)) as cluster:
        yield cluster
