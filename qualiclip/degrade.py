"""The ``degrade`` stage: pristine images -> WebDataset shards of QualiCLIP samples.

Three pieces, so a process pool (`run_degrade`) and a Prefect flow (flows/degrade_shards.py) run
the same code:

    plan = plan_degrade(cfg, ingest_dir, out_dir)            # which shards, which are missing
    entries = [write_one_shard(job, cfg, plan.images_dir, plan.out_dir) for job in plan.pending]
    result = finalize_degrade(plan, entries)                 # checks the set, writes index.json

Output bytes depend only on the manifest, the config and the seed: each sample has its own
random stream seeded by (seed, image id, variant), and each shard is written by one job.
Shards appear atomically; an interrupted run resumes where it stopped and ends byte-identical.
Each shard's index entry (size, sha256) is recorded beside it when it is written
(``shard-NNNNNN.tar.json``); a resumed run keeps a shard only if the file still matches its
record and rewrites it otherwise. A finished set (``index.json`` present) is never resumed: a run
on it starts afresh, so a forced run (``dvc repro --force degrade``) or a code change regenerates
every shard. A run holds the output folder's lock (`degrade_lock`): a second run into the same
folder fails at once instead of wiping the first one's shards. The output folder may be a bucket
prefix (``s3://bucket/prefix``): every file operation goes through `store.Store`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from .config import config_fields
from .errors import QualiclipError
from .identity import plan_digest
from .ingest import check_crop, images_dir, load_image, read_manifest
from .sampling import make_sample
from .schema import DegradeConfig
from .shards import (
    FORMAT_VERSION,
    INDEX_FILE,
    SHARD_NAME,
    SHARD_PATTERN,
    encode_crops,
    sample_json,
    shard_problem,
    write_shard,
)
from .store import Store, open_store

PLAN_FILE = "plan.json"
# memory of one planned sample: its (image id, variant) tuple and the list slots that hold it twice (measured ~110 B)
PLAN_BYTES_PER_SAMPLE = 128
LOCK_FILE = ".degrade.lock"  # held for a whole run; stays (empty) in the folder
RECORD_SUFFIX = ".json"  # shard-000000.tar.json: the shard's index entry, written right after the shard
LOCK_DIR_ENV = "QUALICLIP_LOCK_DIR"  # where the locks of bucket outputs live (default ~/.cache/qualiclip/locks)
# what a run may find in, and delete from, its output folder (temporary names: <name>.<pid>.tmp)
_OWN_FILES = (
    "shard-*.tar",
    f"shard-*.tar{RECORD_SUFFIX}",
    "shard-*.tmp",
    INDEX_FILE,
    PLAN_FILE,
    f"{PLAN_FILE}*.tmp",
    f"{INDEX_FILE}*.tmp",
    LOCK_FILE,
)


class DegradeError(QualiclipError, RuntimeError):
    """The degrade stage cannot run; the message names the fix."""


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
    images_dir: str  # absolute, as every shard job names it
    out_dir: str  # absolute path, or the bucket URL (`store.Store.location`)
    plan_hash: str
    shards: tuple[ShardJob, ...]
    pending: tuple[ShardJob, ...]


@dataclass(frozen=True)
class DegradeResult:
    out_dir: str  # absolute path, or the bucket URL
    shards: int
    samples: int
    bytes: int
    resumed_shards: int


def plan_jobs(ids: list[str], cfg: DegradeConfig) -> tuple[ShardJob, ...]:
    """Shards of ``samples_per_shard`` (image id, variant) jobs, in a fixed order."""
    jobs = [(i, v) for i in ids for v in range(cfg.variants)]
    n = cfg.samples_per_shard
    return tuple(ShardJob(k, tuple(jobs[s : s + n])) for k, s in enumerate(range(0, len(jobs), n)))


def check_plan_fits(n_images: int, cfg: DegradeConfig, memory: int | None = None) -> None:
    """Refuse ``degrade.variants`` whose plan (one entry per sample, held in memory) cannot fit in
    half of ``memory`` bytes (default: this machine's RAM), before the plan is built: the upper
    bound of ``variants`` depends on the number of images, so the schema's fixed one is not enough."""
    memory = memory if memory is not None else _machine_memory()
    most = max(0, memory // 2 // (PLAN_BYTES_PER_SAMPLE * n_images))
    if cfg.variants > most:
        raise DegradeError(
            f"degrade.variants {cfg.variants} plans {n_images * cfg.variants:,} samples for {n_images} images: the plan "
            f"alone would need ~{n_images * cfg.variants * PLAN_BYTES_PER_SAMPLE / 1e9:.3g} GB, more than half this "
            f"machine's {memory / 1e9:.3g} GB of memory — set degrade.variants to at most {most}"
        )


def _machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): assume 16 GB
        return 16 << 30


# ---------------------------------------------------------------------------------------------
# The three pieces


def plan_degrade(cfg: DegradeConfig, ingest_dir: Path, out_dir: str | os.PathLike) -> DegradePlan:
    """Plan the shards and prepare ``out_dir`` (a folder, or a bucket prefix ``s3://bucket/prefix``):
    keep the shards of an interrupted run of the same plan, wipe anything else (another plan, or a
    finished set: see `_prepare_out_dir`).

    Raises `DegradeError` for an empty split or an ``out_dir`` holding files that are not shards
    (it is never wiped then), `ConfigError` for a crop larger than an image (unknown distortions
    were refused when ``cfg`` was built).
    """
    rows = plan_rows(cfg, ingest_dir)
    shards = plan_jobs([r["id"] for r in rows], cfg)
    store = open_store(out_dir)
    plan_hash = plan_digest(cfg, rows, FORMAT_VERSION)
    files = _prepare_out_dir(store, plan_hash, len(shards))
    pending = tuple(j for j in shards if not _intact(store, j, files))
    # absolute: shard jobs may run in other processes, other machines (Dask), other working folders
    images = str(Path(images_dir(ingest_dir)).resolve())
    return DegradePlan(cfg, images, store.location, plan_hash, shards, pending)


def plan_rows(cfg: DegradeConfig, ingest_dir: Path) -> list[dict]:
    """The manifest rows ``cfg`` degrades, checked: the split has images, the crop fits every one
    of them, the plan fits in memory (shared by `plan_degrade` and the on-the-fly loader)."""
    rows = read_manifest(ingest_dir, cfg.split)
    if not rows:
        raise DegradeError(
            f"the manifest in {ingest_dir} has no '{cfg.split}' images — "
            "add pristine photos and rerun ingest, or set degrade.split"
        )
    check_crop(ingest_dir, rows, cfg.sample.crop, "degrade.crop")
    check_plan_fits(len(rows), cfg)
    return rows


def write_one_shard(job: ShardJob, cfg: DegradeConfig, images_dir: str, out_dir: str) -> dict:
    """Render and write one shard atomically, then its record; returns its index entry
    (name, samples, bytes, sha256)."""
    samples = [_make_record(image_id, v, cfg, images_dir) for image_id, v in job.samples]
    store = open_store(out_dir)
    entry = write_shard(store.url_of(job.name), samples)
    _write_json(store, _record_name(job.name), entry)
    return entry


def finalize_degrade(plan: DegradePlan, entries: Iterable[dict]) -> DegradeResult:
    """Check every planned shard exists with the size it was written with, then write index.json
    (atomically, last) from the entries recorded when the shards were written."""
    store = open_store(plan.out_dir)
    if _read_json(store, PLAN_FILE).get("plan") != plan.plan_hash:
        raise DegradeError(
            f"{plan.out_dir} was taken over by another degrade run (plan.json changed) — "
            "rerun the degrade stage, one run per output folder"
        )
    by_name = {e["name"]: e for e in entries}
    shards = [by_name.get(j.name) or _read_json(store, _record_name(j.name)) for j in plan.shards]
    files = store.entries()
    bad = [
        j.name
        for j, e in zip(plan.shards, shards)
        if not e or shard_problem(store, j.name, e, files.get(j.name), check_hash=False)
    ]
    if bad:
        raise DegradeError(
            f"{len(bad)} planned shards are missing or changed in {plan.out_dir} (e.g. {bad[0]}) — "
            "a shard job failed; rerun the degrade stage to finish the set"
        )
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
    store.write_bytes(INDEX_FILE, json.dumps(index, indent=1, sort_keys=True, default=list).encode())
    return DegradeResult(
        plan.out_dir, len(shards), index["total_samples"], index["total_bytes"], len(plan.shards) - len(plan.pending)
    )


def run_degrade(
    cfg: DegradeConfig, ingest_dir: Path, out_dir: str | os.PathLike, *, progress: bool = True
) -> DegradeResult:
    """Generate (or finish generating) the shards for ``cfg`` in ``out_dir`` (a folder or an ``s3://``
    prefix) with ``cfg.workers`` processes.

    ``progress``: a progress bar on stderr when it is a terminal (none in logs and pipes).
    """
    with degrade_lock(out_dir):
        plan = plan_degrade(cfg, ingest_dir, out_dir)
        entries = _run_jobs(plan, progress)
        return finalize_degrade(plan, entries)


@contextlib.contextmanager
def degrade_lock(out_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of the output folder for a whole run (plan, shard jobs, finalize).

    A second run into the same folder raises `DegradeError` at once instead of wiping the shards
    of the first (a file lock: released by the OS if the holder is killed). A folder that holds
    other files is refused first, so the lock file is never created in it. The lock of a bucket
    prefix is a local file named by its URL (`lock_path`): it excludes runs on this machine, or on
    machines sharing ``$QUALICLIP_LOCK_DIR`` (docs/shards.md, "Object storage").
    """
    from filelock import FileLock, Timeout

    store = open_store(out_dir)
    if files := store.entries():
        _check_only_shard_files(store, files)
    store.mkdir()
    lock = FileLock(lock_path(store), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise DegradeError(
            f"another qualiclip degrade is writing to {store.url} — wait for it to finish, or choose another --out"
        ) from None
    try:
        yield
    finally:
        lock.release()


def lock_path(store: Store) -> str:
    """``.degrade.lock`` in a folder on disk; for a bucket prefix, ``<lock dir>/<sha256 of its URL>.lock``."""
    if store.local:
        return store.path(LOCK_FILE)
    folder = Path(os.environ.get(LOCK_DIR_ENV) or Path.home() / ".cache" / "qualiclip" / "locks")
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"degrade-{hashlib.sha256(store.location.encode()).hexdigest()[:32]}.lock")


# ---------------------------------------------------------------------------------------------
# Planning and the output folder


def _prepare_out_dir(store: Store, plan_hash: str, n_shards: int) -> dict[str, int | None]:
    """Resume an interrupted run of the same plan; wipe anything else; refuse a folder of other files.
    Returns what the folder then holds (name -> size).

    Interrupted means: plan.json names this plan and index.json, written last, is absent. A
    finished set is wiped although its plan matches, because the stage only runs on one when
    something the plan does not see has changed: the code (a DVC dependency) or nothing at all
    (``dvc repro --force``), and either way the user asked for new shards.
    """
    files = store.entries()
    finished = INDEX_FILE in files
    same = PLAN_FILE in files and _read_json(store, PLAN_FILE).get("plan") == plan_hash and not finished
    if files and not same:
        _check_only_shard_files(store, files)
        store.delete([n for n in files if n != LOCK_FILE])  # the lock is held by this run
        files = {}
    store.mkdir()
    # temporary files (an orphaned worker of a killed run may still remove its own) and shards past the plan
    stale = [n for n in files if n.endswith(".tmp") or _beyond_plan(n, n_shards)]
    store.delete(stale)
    if not same:
        _write_json(store, PLAN_FILE, {"plan": plan_hash})
    return {n: size for n, size in files.items() if n not in stale}


def _beyond_plan(name: str, n_shards: int) -> bool:
    """A shard or record name that no job of this plan writes."""
    if not (fnmatch.fnmatchcase(name, "shard-*.tar") or fnmatch.fnmatchcase(name, f"shard-*.tar{RECORD_SUFFIX}")):
        return False
    return not SHARD_NAME.fullmatch(name.removesuffix(RECORD_SUFFIX)) or int(name[6:12]) >= n_shards


def _record_name(name: str) -> str:
    return f"{name}{RECORD_SUFFIX}"


def _intact(store: Store, job: ShardJob, files: dict[str, int | None]) -> bool:
    """Whether the shard of ``job`` survives from an earlier run as written: its file matches the
    size and sha256 recorded beside it. Anything else is removed, to be written again."""
    record = _record_name(job.name)
    entry = _read_json(store, record) if record in files else {}
    if (
        entry.get("samples") == len(job.samples)
        and {"bytes", "sha256"} <= set(entry)
        and shard_problem(store, job.name, entry, files.get(job.name)) is None
    ):
        return True
    store.delete([n for n in (job.name, record) if n in files])
    return False


def _check_only_shard_files(store: Store, files: dict[str, int | None]) -> None:
    other = sorted(
        n for n, size in files.items() if size is None or not any(fnmatch.fnmatchcase(n, own) for own in _OWN_FILES)
    )
    if other:
        raise DegradeError(
            f"{store.url} holds files that are not shards (e.g. {other[0]}); refusing to delete it — "
            "choose another --out or empty the folder"
        )


def _read_json(store: Store, name: str) -> dict:
    """A JSON object from ``name``; {} for a missing, torn or foreign file (plan, record or index)."""
    try:
        value = json.loads(store.read_bytes(name))
    except (OSError, ValueError):
        return {}  # a torn plan file: treat as another plan, i.e. start over
    return value if isinstance(value, dict) else {}


def _write_json(store: Store, name: str, value: dict) -> None:
    store.write_bytes(name, json.dumps(value, sort_keys=True).encode())


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
        with _workers_ignore_sigint():
            pool = mp.get_context("spawn").Pool(min(plan.cfg.workers, len(args)), initializer=_pool_worker)
        with pool:
            for r in pool.imap_unordered(_shard_job, args):
                results.append(r)
                bar.update()
    bar.close()
    return results


def limit_threads() -> None:
    """OpenCV on one thread: shard jobs run one per core (a pool or cluster worker); nested threads oversubscribe."""
    cv2.setNumThreads(1)


@contextlib.contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """Start pool workers with SIGINT ignored from birth: a worker still importing when Ctrl-C comes
    (before `_pool_worker` runs) would print a traceback. The ignored disposition survives exec,
    and Python then installs no KeyboardInterrupt handler; the parent's own is restored at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _pool_worker() -> None:
    """A pool worker leaves Ctrl-C to the parent, which stops the pool: the terminal's SIGINT reaches
    every process of the group, and each worker would print its own KeyboardInterrupt traceback
    (also set here for a worker the pool starts later, to replace one that died)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limit_threads()


def _shard_job(args: tuple) -> dict:
    return write_one_shard(*args)


def sample_key(image_id: str, variant: int) -> str:
    """The WebDataset key of a sample (``<image id>_<variant>``): its name in a shard."""
    return f"{image_id}_{variant:04d}"


def render_sample(image_id: str, variant: int, cfg: DegradeConfig, images_dir: str) -> tuple[np.ndarray, dict]:
    """The one sample of (image id, variant): uint8 crops (2, L, H, W, 3) and its metadata.

    The single definition of a sample's content: `write_one_shard` encodes it into a shard, and
    the on-the-fly loader (`qualiclip.onthefly`) hands it to training as it is, so both give the
    same pixels. Its random stream is seeded by (seed, image id, variant) alone.
    """
    seed = [cfg.seed, int(image_id, 16), variant]
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    sample = make_sample(load_image(images_dir, image_id), cfg.sample, rng)
    return sample.crops, {"source_id": image_id, "variant": variant, "seed": seed, **sample.meta}


def _make_record(image_id: str, variant: int, cfg: DegradeConfig, images_dir: str) -> dict:
    crops, meta = render_sample(image_id, variant, cfg, images_dir)
    members = encode_crops(crops, meta["levels"], cfg.encoding)
    return {"__key__": sample_key(image_id, variant), "json": sample_json(meta, members), **members}
