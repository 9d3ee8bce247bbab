"""DDP under torchrun: 2 CPU processes (gloo), each on its own shard, stay identical replicas."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import CLEAN_ENV, ROOT, make_photos, tiny_params

ENTRY = """
import json, sys, warnings
warnings.simplefilter("ignore")
from pathlib import Path
from qualiclip.model import ModelConfig
from qualiclip.train import TrainConfig, run_train

args = json.loads(sys.argv[1])
result = run_train(TrainConfig(**args["train"]), ModelConfig(), Path(args["shards"]), Path(args["out"]), progress=False)
# one marker file per rank: two ranks printing to one pipe can interleave their lines
import os
Path(args["out"], f"done-rank{os.environ['RANK']}").write_text(str(result.steps))
"""


def build_shards(root: Path) -> Path:
    """Two tiny shards (one per process) from 4 synthetic photos, via ingest + degrade."""
    from qualiclip.degrade import DegradeConfig, run_degrade
    from qualiclip.ingest import IngestConfig, run_ingest
    from qualiclip.sampling import SampleConfig

    make_photos(root / "photos", n=4, size=(80, 96))
    run_ingest(
        IngestConfig(sources=(str(root / "photos"),), min_size=64, val_fraction=0.0, workers=1),
        root / "ingest",
        progress=False,
    )
    cfg = DegradeConfig(
        variants=2, samples_per_shard=4, workers=1, sample=SampleConfig(crop=64, distortions=("gaussian_blur", "jpeg"))
    )
    run_degrade(cfg, root / "ingest", root / "shards", progress=False)
    return root / "shards"


@pytest.mark.slow
def test_two_gloo_processes_keep_identical_replicas(tmp_path):
    shards = build_shards(tmp_path)
    script = tmp_path / "entry.py"
    script.write_text(ENTRY)
    train = {
        "steps": 4,
        "batch_size": 2,
        "num_workers": 0,
        "shuffle_buffer": 4,
        "log_every": 1,
        "threads": 1,
        "warmup_steps": 1,
        "checkpoint_every": 2,
        "dist_backend": "gloo",
    }
    args = json.dumps({"train": train, "shards": str(shards), "out": str(tmp_path / "out")})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), args]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, env={**os.environ, **CLEAN_ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = sorted((tmp_path / "out").glob("done-rank*"))
    assert [d.read_text() for d in done] == ["4", "4"]  # both ranks finished
    assert time.perf_counter() - start < 60

    meta = json.loads((tmp_path / "out" / "checkpoint" / "metadata.json").read_text())
    assert meta["world_size"] == 2
    # Each rank read its own shard, so without DDP's gradient all-reduce (and buffer broadcast
    # for BatchNorm statistics) these digests would differ.
    digests = meta["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    rows = list(csv.DictReader(open(tmp_path / "out" / "train_log.csv")))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]


@pytest.mark.slow
def test_the_train_command_under_torchrun_prints_its_summary_once(tmp_path):
    """Every rank runs the stage; only rank 0 reports it (issue 27: the `train:` line came twice)."""
    shards = build_shards(tmp_path)
    params = tiny_params(
        [str(tmp_path / "photos")],
        tracking__backend="none",
        train__steps=2,
        train__dist_backend="gloo",
        train__checkpoint_every=2,
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "qualiclip.pipeline.cli",
        "train",
        "--params",
        str(tmp_path / "params.yaml"),
        "--shards",
        str(shards),
        "--out",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, **CLEAN_ENV, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("train: 2 steps")]
    assert len(summaries) == 1, proc.stdout
