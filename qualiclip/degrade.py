"""The ``degrade`` stage: pristine images -> WebDataset shards of QualiCLIP samples.

Three pieces, so a process pool (`run_degrade`) and a Prefect flow (flows/degrade_flow.py) run
the same code:

    plan = plan_degrade(cfg, ingest_dir, out_dir)            # which shards, which are missing
    entries = [write_one_shard(job, cfg, plan.images_dir, plan.out_dir) for job in plan.pending]
    result = finalize_degrade(plan, entries)                 # checks the set, writes index.json

Output bytes depend only on the manifest, the config and the seed: each sample has its own
random stream seeded by (seed, image id, variant), and each shard is written by one job.
Shards appear atomically; an interrupted run resumes where it stopped and ends byte-identical.
A finished set (``index.json`` present) is never resumed: a run on it starts afresh, so a
forced run (``dvc repro --force degrade``) or a code change regenerates every shard.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import cv2
import numpy as np
from tqdm import tqdm

from .config import config_fields
from .errors import QualiclipError
from .ingest import images_dir, load_image, read_manifest
from .sampling import SampleConfig, make_sample, validate_distortion_names
from .shards import (
    ENCODINGS,
    FORMAT_VERSION,
    INDEX_FILE,
    SHARD_PATTERN,
    encode_crops,
    sample_json,
    sha256_file,
    write_shard,
)

PLAN_FILE = "plan.json"
_OWN_FILES = ("shard-*.tar", "shard-*.tmp", INDEX_FILE, PLAN_FILE, f"{PLAN_FILE}.tmp", f"{INDEX_FILE}.tmp")


class DegradeError(QualiclipError, RuntimeError):
    """The degrade stage cannot run; the message names the fix."""


@dataclass(frozen=True)
class DegradeConfig:
    """The ``degrade`` section of params.yaml (see docs/shards.md); how one sample is drawn sits
    in it, flat (crop, min_overlap, max_distortions, include_pristine, distortions)."""

    seed: int = 0
    variants: int = 24  # samples per pristine image
    samples_per_shard: int = 32
    workers: int = 2  # processes; the output bytes do not depend on it
    encoding: Literal["png", "webp", "npy"] = "png"
    split: str = "train"  # which ingest split to degrade
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        values = config_fields(self)
        for key in ("variants", "samples_per_shard", "workers", "crop", "max_distortions"):
            if values[key] < 1:
                raise DegradeError(f"degrade.{key} must be an integer >= 1, got {values[key]!r} — fix params.yaml")
        if not 0.0 <= self.sample.min_overlap <= 1.0:
            raise DegradeError(f"degrade.min_overlap must be in [0, 1], got {self.sample.min_overlap!r} — fix params.yaml")
        if self.encoding not in ENCODINGS:
            raise DegradeError(f"degrade.encoding must be one of {list(ENCODINGS)}, got {self.encoding!r}")


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: its position in the plan and its (image id, variant) samples, in order."""

    index: int
    samples: tuple[tuple[str, int], ...]

    @property
    def name(self) -> str:
        return SHARD_PATTERN.format(self.index)


@dataclass(frozen=True)
class DegradePlan:
    """Every shard of a run, and those still to write (the rest survive from an interrupted run)."""

    cfg: DegradeConfig
    images_dir: str
    out_dir: str
    plan_hash: str
    shards: tuple[ShardJob, ...]
    pending: tuple[ShardJob, ...]


@dataclass(frozen=True)
class DegradeResult:
    out_dir: Path
    shards: int
    samples: int
    bytes: int
    resumed_shards: int


def plan_jobs(ids: list[str], cfg: DegradeConfig) -> tuple[ShardJob, ...]:
    """Shards of ``samples_per_shard`` (image id, variant) jobs, in a fixed order."""
    jobs = [(i, v) for i in ids for v in range(cfg.variants)]
    n = cfg.samples_per_shard
    return tuple(ShardJob(k, tuple(jobs[s:s + n])) for k, s in enumerate(range(0, len(jobs), n)))


# ---------------------------------------------------------------------------------------------
# The three pieces


def plan_degrade(cfg: DegradeConfig, ingest_dir: Path, out_dir: Path) -> DegradePlan:
    """Plan the shards and prepare ``out_dir``: keep the shards of an interrupted run of the same
    plan, wipe anything else (another plan, or a finished set: see `_prepare_out_dir`).

    Raises `DegradeError` for an unknown distortion, an empty split, or an ``out_dir`` holding
    files that are not shards (it is never wiped then).
    """
    validate_distortion_names(cfg.sample.distortions)
    rows = read_manifest(ingest_dir, cfg.split)
    if not rows:
        raise DegradeError(f"the manifest in {ingest_dir} has no '{cfg.split}' images — "
                           "add pristine photos and rerun ingest, or set degrade.split")
    shards = plan_jobs([r["id"] for r in rows], cfg)
    out_dir = Path(out_dir)
    plan_hash = _plan_hash(cfg, rows)
    _prepare_out_dir(out_dir, plan_hash, len(shards))
    pending = tuple(j for j in shards if not (out_dir / j.name).is_file())
    return DegradePlan(cfg, images_dir(ingest_dir), str(out_dir), plan_hash, shards, pending)


def write_one_shard(job: ShardJob, cfg: DegradeConfig, images_dir: str, out_dir: str) -> dict:
    """Render and write one shard atomically; returns its index entry (name, samples, bytes, sha256)."""
    samples = [_make_record(image_id, v, cfg, images_dir) for image_id, v in job.samples]
    return write_shard(Path(out_dir) / job.name, samples)


def finalize_degrade(plan: DegradePlan, entries: Iterable[dict]) -> DegradeResult:
    """Check every planned shard exists, then write index.json (atomically, last)."""
    out_dir = Path(plan.out_dir)
    missing = [j.name for j in plan.shards if not (out_dir / j.name).is_file()]
    if missing:
        raise DegradeError(f"{len(missing)} planned shards are missing in {out_dir} (e.g. {missing[0]}) — "
                           "a shard job failed; rerun the degrade stage to finish the set")
    by_name = {e["name"]: e for e in entries}
    shards = [by_name.get(j.name) or _entry_from_file(out_dir / j.name, len(j.samples)) for j in plan.shards]
    index = {
        "format_version": FORMAT_VERSION,
        "plan": plan.plan_hash,
        "config": {k: v for k, v in config_fields(plan.cfg).items() if k != "workers"},
        "shards": shards,
        "total_samples": sum(s["samples"] for s in shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "encoding": plan.cfg.encoding,
        "crop": plan.cfg.sample.crop,
    }
    _write_atomic(out_dir / INDEX_FILE, json.dumps(index, indent=1, sort_keys=True, default=list))
    return DegradeResult(out_dir, len(shards), index["total_samples"], index["total_bytes"],
                         len(plan.shards) - len(plan.pending))


def run_degrade(cfg: DegradeConfig, ingest_dir: Path, out_dir: Path, *, progress: bool = True) -> DegradeResult:
    """Generate (or finish generating) the shards for ``cfg`` in ``out_dir`` with ``cfg.workers`` processes.

    ``progress``: a progress bar on stderr when it is a terminal (none in logs and pipes).
    """
    plan = plan_degrade(cfg, ingest_dir, out_dir)
    entries = _run_jobs(plan, progress)
    return finalize_degrade(plan, entries)


# ---------------------------------------------------------------------------------------------
# Planning and the output folder


def _plan_hash(cfg: DegradeConfig, rows: list[dict]) -> str:
    # workers changes nothing in the output, so it is not part of the plan
    key = {k: v for k, v in config_fields(cfg).items() if k != "workers"}
    blob = json.dumps([FORMAT_VERSION, key, [(r["id"], r["sha256"]) for r in rows]], sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()


def _prepare_out_dir(out_dir: Path, plan_hash: str, n_shards: int) -> None:
    """Resume an interrupted run of the same plan; wipe anything else; refuse a folder of other files.

    Interrupted means: plan.json names this plan and index.json, written last, is absent. A
    finished set is wiped although its plan matches, because the stage only runs on one when
    something the plan does not see has changed: the code (a DVC dependency) or nothing at all
    (``dvc repro --force``), and either way the user asked for new shards.
    """
    plan_path = out_dir / PLAN_FILE
    finished = (out_dir / INDEX_FILE).is_file()
    same = plan_path.is_file() and _read_json(plan_path).get("plan") == plan_hash and not finished
    if out_dir.exists() and not same:
        _check_only_shard_files(out_dir)
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.tmp"):
        stale.unlink()
    for extra in out_dir.glob("shard-*.tar"):
        if int(extra.name[6:12]) >= n_shards:
            extra.unlink()
    if not same:
        _write_atomic(plan_path, json.dumps({"plan": plan_hash}))


def _check_only_shard_files(out_dir: Path) -> None:
    if not out_dir.is_dir():
        raise DegradeError(f"degrade output {out_dir} exists and is not a folder — choose another --out")
    ours = {p for pattern in _OWN_FILES for p in out_dir.glob(pattern)}
    other = sorted(p.name for p in out_dir.iterdir() if p not in ours)
    if other:
        raise DegradeError(f"{out_dir} holds files that are not shards (e.g. {other[0]}); refusing to delete it — "
                           "choose another --out or empty the folder")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a torn plan file: treat as another plan, i.e. start over


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _entry_from_file(path: Path, samples: int) -> dict:
    """The index entry of a shard written by an earlier, interrupted run."""
    return {"name": path.name, "samples": samples, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


# ---------------------------------------------------------------------------------------------
# Running the jobs and making one sample


def _run_jobs(plan: DegradePlan, progress: bool) -> list[dict]:
    args = [(job, plan.cfg, plan.images_dir, plan.out_dir) for job in plan.pending]
    bar = tqdm(total=len(args), desc="degrade shards", unit="shard", disable=None if progress else True)
    results = []
    if plan.cfg.workers <= 1 or len(args) <= 1:
        for a in args:
            results.append(_shard_job(a))
            bar.update()
    else:
        # spawn, not fork: the parent may hold torch/OpenMP threads that do not survive fork
        with mp.get_context("spawn").Pool(min(plan.cfg.workers, len(args)), initializer=_init_worker) as pool:
            for r in pool.imap_unordered(_shard_job, args):
                results.append(r)
                bar.update()
    bar.close()
    return results


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core; nested threads only oversubscribe


def _shard_job(args: tuple) -> dict:
    return write_one_shard(*args)


def _make_record(image_id: str, variant: int, cfg: DegradeConfig, images_dir: str) -> dict:
    seed = [cfg.seed, int(image_id, 16), variant]
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    sample = make_sample(load_image(images_dir, image_id), cfg.sample, rng)
    meta = {"source_id": image_id, "variant": variant, "seed": seed, **sample.meta}
    crops = encode_crops(sample.crops, meta["levels"], cfg.encoding)
    return {"__key__": f"{image_id}_{variant:04d}", "json": sample_json(meta, crops), **crops}
