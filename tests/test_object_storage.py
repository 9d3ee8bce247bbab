"""Shards in an S3 bucket (moto's S3 server on 127.0.0.1): degrade writes and resumes there, the
loader and the train stage stream from there, and everything equals the same run on disk."""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import CLEAN_ENV, bin_path, kill_midway_then_rerun

from qualiclip.config import build_config
from qualiclip.degrade import LOCK_FILE, DegradeConfig, DegradeError, degrade_lock, run_degrade
from qualiclip.loader import iterate_batches
from qualiclip.model import ModelConfig
from qualiclip.sampling import SampleConfig
from qualiclip.shards import ShardError
from qualiclip.store import StoreError
from qualiclip.train import TrainConfig, run_train

TYPES = ("gaussian_blur", "white_noise", "jpeg", "brighten")
CFG = DegradeConfig(variants=3, samples_per_shard=2, workers=1, sample=SampleConfig(crop=32, distortions=TYPES))
KILL_CFG = {"variants": 12, "samples_per_shard": 2, "workers": 2, "crop": 64, "distortions": list(TYPES)}


@pytest.fixture(autouse=True)
def lock_dir(tmp_path, monkeypatch) -> Path:
    """The locks of bucket outputs live here, not in the home folder."""
    monkeypatch.setenv("QUALICLIP_LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path / "locks"


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file of a shard folder but the (empty) lock, which a bucket does not hold."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.name != LOCK_FILE}


def object_digests(s3_server, url: str) -> dict[str, str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return {k: hashlib.sha256(v).hexdigest() for k, v in s3_server.objects(bucket, prefix + "/").items()}


def put(s3_server, url: str, data: bytes) -> None:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=data)


def test_shards_in_a_bucket_are_byte_identical_to_shards_on_disk(ingest_dir, tmp_path, s3_server, s3_bucket, lock_dir):
    url = f"{s3_bucket}/shards"
    remote = run_degrade(CFG, ingest_dir, url, progress=False)
    local = run_degrade(CFG, ingest_dir, tmp_path / "local", progress=False)
    assert (
        (remote.shards, remote.samples, remote.bytes)
        == (local.shards, local.samples, local.bytes)
        == (6, 12, local.bytes)
    )
    ref = file_digests(tmp_path / "local")
    assert {"index.json", "plan.json", "shard-000005.tar", "shard-000005.tar.json"} <= set(ref)
    assert object_digests(s3_server, url) == ref
    run_degrade(CFG, ingest_dir, f"file://{tmp_path}/file-url", progress=False)  # a file:// URL is a folder
    assert file_digests(tmp_path / "file-url") == ref
    assert len(list(lock_dir.glob("degrade-*.lock"))) == 1  # the bucket's lock is a local file
    again = run_degrade(CFG, ingest_dir, url, progress=False)  # a finished set is regenerated, not resumed
    assert again.resumed_shards == 0 and object_digests(s3_server, url) == ref


def test_damaged_objects_are_refused_by_the_loader_and_rewritten_on_resume(ingest_dir, s3_server, s3_bucket):
    url = f"{s3_bucket}/shards"
    run_degrade(CFG, ingest_dir, url, progress=False)
    first = object_digests(s3_server, url)
    objects = s3_server.objects(url.removeprefix("s3://").split("/")[0], "shards/")
    damaged = bytearray(objects["shard-000002.tar"])
    damaged[1000:1009] = b"\x00damaged\x00"  # same size, other bytes: only the sha256 tells
    put(s3_server, f"{url}/shard-000002.tar", bytes(damaged))
    with pytest.raises(ShardError, match="shard-000002.tar does not match its index entry"):
        list(iterate_batches(url, 4, shuffle_buffer=0, repeat=False))
    put(s3_server, f"{url}/shard-000004.tar", objects["shard-000001.tar"])  # another shard's bytes
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    s3_server.client().delete_object(Bucket=bucket, Key=f"{prefix}/index.json")  # an interrupted run: it resumes
    again = run_degrade(CFG, ingest_dir, url, progress=False)
    assert again.resumed_shards == 4 and object_digests(s3_server, url) == first


@pytest.mark.slow
def test_sigkill_midway_then_rerun_resumes_against_the_bucket(ingest_dir, tmp_path, s3_server, s3_bucket):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tracking": {"backend": "none"}, "degrade": KILL_CFG}))
    url = f"{s3_bucket}/shards"
    kill_midway_then_rerun(params, ingest_dir, url, lambda: list(object_digests(s3_server, url)), total=24)
    cfg = build_config(DegradeConfig, {**KILL_CFG, "workers": 1}, where="degrade")
    run_degrade(cfg, ingest_dir, tmp_path / "reference", progress=False)
    assert object_digests(s3_server, url) == file_digests(tmp_path / "reference")


def test_a_bucket_prefix_is_locked_and_a_missing_bucket_is_named(ingest_dir, s3_server, s3_bucket):
    url = f"{s3_bucket}/shards"
    with degrade_lock(url):
        with pytest.raises(DegradeError, match=f"another qualiclip degrade is writing to {url}"):
            run_degrade(CFG, ingest_dir, url, progress=False)
    assert run_degrade(CFG, ingest_dir, url, progress=False).shards == 6  # released
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' of s3://no-such-bucket/x does not exist"):
        run_degrade(CFG, ingest_dir, "s3://no-such-bucket/x", progress=False)


def test_the_command_a_missing_bucket_names_creates_it(ingest_dir, tmp_path, s3_server, s3_bucket):
    """The fix the error names runs with what the project installs (issue 27: it named the AWS CLI)."""
    bucket = f"made-by-the-hint-{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]}"
    with pytest.raises(StoreError) as refused:
        run_degrade(CFG, ingest_dir, f"s3://{bucket}/shards", progress=False)
    command = str(refused.value).split("create it first: ", 1)[1].split(" (s3fs", 1)[0]
    env = {**os.environ, **CLEAN_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(command, shell=True, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{command}: {proc.stderr[-2000:]}"
    assert run_degrade(CFG, ingest_dir, f"s3://{bucket}/shards", progress=False).shards == 6


# ---------------------------------------------------------------------------------------------
# Reading: the loader and the train stage


@pytest.fixture
def twin_shards(ingest_dir, tmp_path, s3_server, s3_bucket) -> tuple[str, Path]:
    """The same 6 shards in the bucket and on disk."""
    url = f"{s3_bucket}/shards"
    run_degrade(CFG, ingest_dir, url, progress=False)
    run_degrade(CFG, ingest_dir, tmp_path / "local", progress=False)
    assert object_digests(s3_server, url) == file_digests(tmp_path / "local")  # the reads below start in the bucket
    return url, tmp_path / "local"


def digests(batches) -> list[str]:
    return [hashlib.sha256(s.numpy().tobytes()).hexdigest() for b in batches for s in b]


def test_the_loader_splits_a_bucket_across_ranks_and_workers_as_a_folder(twin_shards, monkeypatch):
    url, local = twin_shards
    parts = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        from_bucket, from_disk = (
            digests(iterate_batches(where, 2, shuffle_buffer=4, num_workers=2, seed=3, repeat=False))
            for where in (url, local)
        )
        assert from_bucket == from_disk and len(from_bucket) == 6
        parts.append(from_bucket)
    assert not set(parts[0]) & set(parts[1]) and len(Counter(parts[0] + parts[1])) == 12


def test_training_from_the_bucket_equals_training_from_disk(twin_shards, tmp_path, one_thread):
    url, local = twin_shards
    cfg = TrainConfig(steps=4, batch_size=2, num_workers=2, shuffle_buffer=4, log_every=1, warmup_steps=1, threads=1)
    for name, where in (("bucket", url), ("disk", local)):
        run_train(cfg, ModelConfig(), where, tmp_path / name, progress=False)
    rows = [list(csv.reader(open(tmp_path / name / "train_log.csv"))) for name in ("bucket", "disk")]
    assert rows[0] == rows[1] and len(rows[0]) == 5
    weights = [(tmp_path / name / "checkpoint" / "model.safetensors").read_bytes() for name in ("bucket", "disk")]
    assert weights[0] == weights[1]


def test_a_bucket_without_credentials_is_one_line_naming_the_fix(ingest_dir, tmp_path, s3_server):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tracking": {"backend": "none"}, "degrade": KILL_CFG}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        CLEAN_ENV,
        AWS_ENDPOINT_URL=s3_server.endpoint,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
    )
    proc = subprocess.run(
        [
            bin_path("qualiclip"),
            "degrade",
            "--params",
            str(params),
            "--ingest",
            str(ingest_dir),
            "--out",
            "s3://any-bucket/shards",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        "cannot reach s3://any-bucket/shards (NoCredentialsError" in proc.stderr and "AWS_ACCESS_KEY_ID" in proc.stderr
    )
