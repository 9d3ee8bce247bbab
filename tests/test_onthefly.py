"""train.source: on_the_fly — the loader renders the degrade plan and gives the shards' stream, byte for byte."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qualiclip.degrade import DegradeConfig, run_degrade
from qualiclip.loader import LoaderStats, iterate_batches
from qualiclip.model import ModelConfig
from qualiclip.onthefly import plan_samples
from qualiclip.sampling import SampleConfig
from qualiclip.train import TrainConfig, TrainError, run_train

# every type, two of them composed: every distortion's draws go through both paths
CFG = DegradeConfig(variants=80, samples_per_shard=20, workers=2, sample=SampleConfig(crop=32, max_distortions=2))
LOADER = dict(shuffle_buffer=16, seed=3)


def digests(batches) -> list[str]:
    return [hashlib.sha256(s.numpy().tobytes()).hexdigest() for b in batches for s in b]


def stream(source, rank: int, monkeypatch, n: int | None = None, repeat: bool = False) -> list[str]:
    """Sample digests, in order, that rank ``rank`` of 2 reads with 2 loader workers (one pass, or
    the first ``n`` batches of 4 of an endless stream)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    options = {**LOADER, "num_workers": 2, "stats": LoaderStats(), "repeat": repeat}
    if isinstance(source, Path):
        batches = iterate_batches(source, 4, **options)
    else:
        batches = source.batches(4, **options)
    return digests(itertools.islice(batches, n) if n else batches)


@pytest.mark.parametrize("encoding", ["webp", "png", "npy"])
def test_on_the_fly_samples_are_the_shards_byte_for_byte_across_2_ranks_and_2_workers(
    ingest_dir, tmp_path, monkeypatch, encoding
):
    # 4 photos × 80 variants = 320 samples in 16 shards (webp); png and npy: 64 samples in 4 shards
    cfg = CFG if encoding == "webp" else dataclasses.replace(CFG, variants=16, samples_per_shard=16)
    cfg = dataclasses.replace(cfg, encoding=encoding)
    run_degrade(cfg, ingest_dir, tmp_path / "shards", progress=False)
    plan = plan_samples(ingest_dir, cfg)
    assert plan.total_samples == 4 * cfg.variants
    seen = []
    for rank in range(2):
        from_shards = stream(tmp_path / "shards", rank, monkeypatch)
        on_the_fly = stream(plan, rank, monkeypatch)
        assert on_the_fly == from_shards
        seen += from_shards
    # the two ranks split the set: every sample once, and the samples differ (the check can fail)
    assert len(seen) == len(set(seen)) == plan.total_samples


def test_endless_streams_agree_across_epochs(ingest_dir, tmp_path, monkeypatch):
    """repeat=True reshuffles the shards each epoch: 25 batches of 4 per rank span four epochs."""
    cfg = dataclasses.replace(CFG, variants=12, samples_per_shard=6)  # 48 samples in 8 shards: 24 per rank and epoch
    run_degrade(cfg, ingest_dir, tmp_path / "shards", progress=False)
    plan = plan_samples(ingest_dir, cfg)
    for rank in range(2):
        endless = stream(plan, rank, monkeypatch, n=25, repeat=True)
        assert len(endless) == 100 and endless == stream(tmp_path / "shards", rank, monkeypatch, n=25, repeat=True)


AFTER_OPENCV_THREADS = """
import sys, cv2, numpy as np
from pathlib import Path
from qualiclip.degrade import DegradeConfig
from qualiclip.onthefly import plan_samples
from qualiclip.sampling import SampleConfig

cv2.setNumThreads(2)  # the parent's OpenCV pool runs, as in any process that has used OpenCV
cv2.GaussianBlur(np.random.rand(1500, 1500, 3).astype(np.float32), (31, 31), 5)
plan = plan_samples(Path(sys.argv[1]), DegradeConfig(variants=4, sample=SampleConfig(crop=32)))
print(sum(len(b) for b in plan.batches(4, num_workers=2, seed=0, repeat=False)))
print(cv2.getNumThreads())
"""


def test_loader_workers_start_after_the_parent_used_opencv_threads(ingest_dir):
    """Workers forked while the parent's OpenCV pool had threads hung in their first OpenCV call
    (the pool's locks copied without its threads): the loader forks with the pool stopped."""
    out = subprocess.run(
        [sys.executable, "-c", AFTER_OPENCV_THREADS, str(ingest_dir)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["16", "2"]  # every sample, and the parent's OpenCV threads as they were


def test_a_plan_with_no_images_of_the_split_names_the_fix(ingest_dir):
    from qualiclip.degrade import DegradeError

    with pytest.raises(DegradeError, match="no 'val' images"):
        plan_samples(ingest_dir, dataclasses.replace(CFG, split="val"))


TRAIN = dict(
    steps=6, batch_size=3, num_workers=1, shuffle_buffer=4, log_every=1, warmup_steps=2, threads=1, checkpoint_every=0
)


def test_training_from_either_source_gives_the_same_losses_and_weights(ingest_dir, tmp_path):
    cfg = dataclasses.replace(CFG, variants=3, samples_per_shard=4)  # 12 samples in 3 shards
    run_degrade(cfg, ingest_dir, tmp_path / "shards", progress=False)
    plan = plan_samples(ingest_dir, cfg)
    runs = {}
    for name, data in (("shards", tmp_path / "shards"), ("on_the_fly", plan)):
        tcfg = TrainConfig(**TRAIN, source=name)
        result = run_train(tcfg, ModelConfig(), data, tmp_path / name, progress=False)
        rows = list(csv.DictReader(open(tmp_path / name / "train_log.csv")))
        runs[name] = (rows, load_file(str(result.checkpoint / "model.safetensors")))
    (rows_a, weights_a), (rows_b, weights_b) = runs["shards"], runs["on_the_fly"]
    assert len(rows_a) == 6 and rows_a == rows_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_a_batch_larger_than_the_plan_names_the_fix(ingest_dir):
    plan = plan_samples(ingest_dir, dataclasses.replace(CFG, variants=1, samples_per_shard=4))
    with pytest.raises(TrainError, match="set train.batch_size to at most 4"):
        run_train(TrainConfig(batch_size=5, steps=1), ModelConfig(), plan, Path("unused"), progress=False)


def documented_train_stage() -> dict:
    """The on-the-fly train stage of docs/training.md, its deps completed as the page says (those of
    the default train stage, data/shards replaced by data/ingest)."""
    import re

    import yaml
    from conftest import ROOT

    text = (ROOT / "docs" / "training.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "--ingest data/ingest" in b)
    stage = yaml.safe_load(block)["train"]
    default = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]
    deps = stage["deps"] + [d for d in default["deps"] if d != "data/shards" and d not in stage["deps"]]
    return {**default, "cmd": stage["cmd"], "deps": deps, "params": stage["params"]}


@pytest.mark.slow
def test_the_documented_dvc_stage_trains_on_the_fly_and_depends_on_the_code_it_loads(tmp_path):
    import json

    import yaml
    from conftest import bin_path, make_dvc_project, make_photos, run, tiny_params

    hook = Path(__file__).resolve().parent / "stage_hook"  # records the library files a stage process loads

    params = tiny_params(["photos"], tracking__backend="none", train__source="on_the_fly")
    root = make_dvc_project(tmp_path / "project", params)
    make_photos(root / "photos", n=4)
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    del pipeline["stages"]["degrade"]
    pipeline["stages"]["train"] = documented_train_stage()
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "init"], root)
    (root / "stage-log").mkdir()
    run([bin_path("dvc"), "repro"], root, PYTHONPATH=str(hook), QUALICLIP_STAGE_LOG=str(root / "stage-log"))
    assert (root / "outputs/train/checkpoint/model.safetensors").is_file() and not (root / "data/shards").exists()
    loaded = {f for f in (root / "stage-log/train.txt").read_text().split() if not f.startswith("qualiclip/pipeline/")}
    code = [d for d in pipeline["stages"]["train"]["deps"] if d.startswith("qualiclip/")]
    assert sorted(f for f in loaded if not any(f == d or f.startswith(d + "/") for d in code)) == []
    for added in ("qualiclip/degrade.py", "qualiclip/onthefly.py", "qualiclip/sampling.py", "qualiclip/distortions"):
        assert any(f == added or f.startswith(added + "/") for f in loaded), added
    # a degrade param is now train's: changing it makes train stale
    params["degrade"]["seed"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "train" in json.loads(run([bin_path("dvc"), "status", "--json"], root).stdout or "{}")
