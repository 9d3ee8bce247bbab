"""Reading shards for training: an explicit list of WebDataset steps.

    shards in epoch order (seeded shard shuffle, the same on every node)
    -> split by node (DDP rank) -> split by DataLoader worker
    -> tar expansion (a shard is opened by path or URL — a folder or an ``s3://`` bucket prefix —
       through fsspec; a damaged shard becomes one error marker, never a silent stop; in the
       first epoch each shard is read once into a spool and its sha256 checked against the
       index before its samples are read, and a shard that differs stops training with a
       `ShardError`)
    -> sample shuffle buffer (seeded per node and worker)
    -> decode + check (a corrupt sample becomes an error marker)
    -> batch in the worker (errors travel with the batch)
    -> main process: count errors in `LoaderStats`, regroup short pieces into full batches.

The stream is a pure function of (shards, seed, num_workers, world size, rank): a run that
restarts with the same settings sees the same batches, so resuming at step k is dropping the
first k batches (``itertools.islice``).
"""

from __future__ import annotations

import functools
import logging
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import cv2
import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from .shards import ShardError, decode_crops, entry_problem, indexed_shards
from .store import hash_stream, open_file, open_store

SPOOL_BYTES = 256 << 20  # a shard checked in epoch 0 is held in memory up to this size, then in a temp file

log = logging.getLogger(__name__)


def _fork_with_opencv_idle() -> None:
    """Fork loader workers while OpenCV's thread pool is stopped.

    A process forked while the parent's OpenCV pool has threads inherits the pool's locks and
    condition variables but not its threads: its first OpenCV call that touches the pool (the
    on-the-fly workers' ``cv2.setNumThreads(1)``, a parallel ``cvtColor``) waits forever. So before
    every fork the parent drops to one OpenCV thread, which stops the pool; after it the parent
    gets its count back (the pool restarts at its next parallel call), and the child keeps one
    thread, which is what a loader worker wants anyway.
    """
    saved: list[int] = []

    def before() -> None:
        saved.append(cv2.getNumThreads())
        cv2.setNumThreads(1)

    def after_in_parent() -> None:
        cv2.setNumThreads(saved.pop())

    os.register_at_fork(before=before, after_in_parent=after_in_parent)


_fork_with_opencv_idle()


@dataclass
class LoaderStats:
    """What the loader saw: good samples, and corrupt ones skipped (with their keys)."""

    samples: int = 0
    corrupt: int = 0
    corrupt_keys: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The steps


def epoch_shards(shards: list[dict], seed: int, repeat: bool, shuffle: bool) -> Iterator[dict]:
    """Shard dicts (url, samples) epoch after epoch; the order depends only on (seed, epoch).

    Every node computes the same order, so ``split_by_node`` hands each shard to one node.
    """
    epoch = 0
    while True:
        order = list(range(len(shards)))
        if shuffle:
            random.Random(f"{seed}/{epoch}").shuffle(order)
        for i in order:
            yield {**shards[i], "epoch": epoch}
        if not repeat:
            return
        epoch += 1


def expand_shards(src: Iterator[dict]) -> Iterator[dict]:
    """Shard dicts -> raw samples (bytes per member). A shard that fails or ends early yields one
    ``__error__`` marker in place of what it lost; one whose sha256 (checked in epoch 0, when
    the dict has one) differs from the index yields only a ``__fatal__`` marker."""
    for shard in src:
        check = "sha256" in shard and shard.get("epoch", 0) == 0
        yield from _shard_samples(shard["url"], shard["samples"], shard if check else None)


def _shard_samples(url: str, expected: int, entry: dict | None = None) -> Iterator[dict]:
    name, n = url.rsplit("/", 1)[-1], 0
    f, problem = _open_shard(url, entry)
    if problem is not None:
        if entry is None:
            yield {"__key__": f"{name}@0", "__error__": f"{name} {problem}"}
        else:
            yield {
                "__key__": name,
                "__fatal__": f"{name} does not match its index entry (it {problem}): replaced, "
                "damaged or from another run",
            }
        return
    assert f is not None  # no problem: the shard is open
    try:
        with f:
            files = ({**member, "__url__": url} for member in tar_file_iterator(f))
            for sample in group_by_keys(files):
                n += 1
                yield sample
    except Exception as exc:  # truncated or garbled tar: report it, go on with the next shard
        yield {"__key__": f"{name}@{n}", "__error__": f"{type(exc).__name__}: {exc} (after {n} of {expected} samples)"}
        return
    if n < expected:  # tarfile ends quietly at a torn header
        yield {"__key__": f"{name}@{n}", "__error__": f"shard ended after {n} of {expected} samples (truncated?)"}


def _open_shard(url: str, entry: dict | None) -> tuple[BinaryIO | None, str | None]:
    """The shard at ``url`` (a path on disk or an ``s3://`` URL: one code path through fsspec) open
    for reading, checked against its index ``entry`` first when one is given: (file, None), or
    (None, what is wrong)."""
    try:
        f = open_file(url)
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    return _checked_copy(f, entry) if entry is not None else (f, None)


def _checked_copy(f: BinaryIO, entry: dict) -> tuple[BinaryIO | None, str | None]:
    """The shard's bytes, read once from ``f`` (then closed) into a spool and checked against its
    index entry: (the spool at offset 0, None), or (None, what differs).

    One read serves the hash and the parse, so a shard in a bucket is fetched once; sha256 runs
    at ~1 GB/s against ~50 MB/s of crop decoding per worker.
    """
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
    try:
        with f:
            size, sha256 = hash_stream(f, spool.write)
    except OSError as exc:
        spool.close()
        return None, f"cannot be read ({exc.strerror or exc})"
    if problem := entry_problem(size, sha256, entry):
        spool.close()
        return None, problem
    spool.seek(0)
    return spool, None  # type: ignore[return-value]  # a SpooledTemporaryFile reads as a binary file


def shuffle_samples(src: Iterator[dict], buffer: int, seed: int) -> Iterator[dict]:
    """A shuffle buffer whose random stream depends on (seed, rank, worker) only."""
    if buffer <= 0:
        yield from src
        return
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    yield from wds.shuffle(buffer, min(buffer, 16), seed=f"{seed}/{rank}/{worker}")(src)


def decode_sample(sample: dict) -> dict:
    """Raw sample -> {"key", "crops": uint8 (2, L, H, W, 3)}, or {"key", "error"} for a bad one."""
    key = sample.get("__key__", "?")
    if "__fatal__" in sample:
        return {"key": key, "error": sample["__fatal__"], "fatal": True}
    if "__error__" in sample:
        return {"key": key, "error": sample["__error__"]}
    try:
        return {"key": key, "crops": decode_crops(sample)}
    except Exception as exc:  # any corrupt member: report, skip, keep training
        return {"key": key, "error": f"{type(exc).__name__}: {exc}"}


def batch_samples(src: Iterator[dict], batch_size: int) -> Iterator[dict]:
    """Decoded samples -> ``{"crops": uint8 (n, 2, L, H, W, 3) or None, "errors": [(key, message)]}``.

    Runs in the loader worker, so a batch crosses to the main process as one shared-memory
    tensor instead of ``batch_size`` small ones (the main process's per-sample cost capped an
    H100's feed; docs/training.md). A corrupt sample flushes the good ones before it as a short
    piece with the error attached; ``iterate_batches`` regroups short pieces.
    """
    good: list[np.ndarray] = []
    for sample in src:
        if sample.get("fatal"):
            yield {"crops": None, "errors": [], "fatal": sample["error"]}
            return
        if "error" in sample:
            yield {"crops": np.stack(good) if good else None, "errors": [(sample["key"], sample["error"])]}
            good = []
            continue
        good.append(sample["crops"])
        if len(good) == batch_size:
            yield {"crops": np.stack(good), "errors": []}
            good = []
    if good:
        yield {"crops": np.stack(good), "errors": []}


def build_dataset(
    shards: list[dict],
    *,
    shuffle_buffer: int,
    seed: int,
    repeat: bool,
    batch_size: int = 1,
    expand: Callable[[Iterator[dict]], Iterator[dict]] = expand_shards,
    decode: Callable[[dict], dict] = decode_sample,
):
    """The WebDataset pipeline over index entries ``{"url", "samples"}`` (see module docstring).

    ``expand`` and ``decode`` are the two steps that know where samples come from: shard files
    (the defaults), or the degrade plan run in the worker (`qualiclip.onthefly`: the same units
    of samples, split and shuffled by the same steps, so both give the same stream).
    """
    return wds.DataPipeline(
        functools.partial(epoch_shards, shards, seed, repeat, shuffle_buffer > 0),
        wds.split_by_node,
        wds.split_by_worker,
        expand,
        functools.partial(shuffle_samples, buffer=shuffle_buffer, seed=seed),
        wds.map(decode),
        functools.partial(batch_samples, batch_size=batch_size),
    )


# ---------------------------------------------------------------------------------------------
# Batches


def iterate_batches(
    shard_dir: str | os.PathLike,
    batch_size: int,
    *,
    shuffle_buffer: int = 64,
    num_workers: int = 0,
    seed: int = 0,
    repeat: bool = True,
    stats: LoaderStats | None = None,
    pin_memory: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield uint8 tensors (B, 2, L, H, W, 3) of training samples; corrupt ones are counted in ``stats``.

    ``repeat=False``: one pass in which every intact sample of this node appears exactly once
    (the last batch may be short). ``repeat=True``: endless, reshuffling shards each epoch; any
    number of workers works, even more than there are shards. Workers build whole batches;
    ``pin_memory`` (for a CUDA consumer) lets the host-to-device copy run asynchronously.
    """
    store = open_store(shard_dir)
    shards = [
        {"url": store.url_of(s["name"]), "samples": s["samples"], "bytes": s["bytes"], "sha256": s["sha256"]}
        for s in indexed_shards(shard_dir)
    ]
    yield from stream_batches(
        shards,
        str(shard_dir),
        batch_size,
        shuffle_buffer=shuffle_buffer,
        num_workers=num_workers,
        seed=seed,
        repeat=repeat,
        stats=stats,
        pin_memory=pin_memory,
    )


def stream_batches(
    shards: list[dict],
    where: str,
    batch_size: int,
    *,
    shuffle_buffer: int,
    num_workers: int,
    seed: int,
    repeat: bool,
    stats: LoaderStats | None,
    pin_memory: bool,
    expand: Callable[[Iterator[dict]], Iterator[dict]] = expand_shards,
    decode: Callable[[dict], dict] = decode_sample,
) -> Iterator[torch.Tensor]:
    """`iterate_batches` over units of samples ``shards`` (``where`` names them in errors), read by
    ``expand`` and ``decode`` (`build_dataset`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stats = stats if stats is not None else LoaderStats()
    ds = build_dataset(
        shards,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        repeat=repeat,
        batch_size=batch_size,
        expand=expand,
        decode=decode,
    )
    workers = num_workers if repeat else min(num_workers, len(shards))  # one pass: a shardless worker idles
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=pin_memory)
    short: list[torch.Tensor] = []  # pieces cut short by a corrupt sample or a worker's end of pass
    # A whole pass's worth of corrupt samples in a row means nothing intact is left: stop, don't spin.
    give_up, streak = max(1, sum(s["samples"] for s in shards)), 0
    for item in loader:
        if item.get("fatal"):
            raise ShardError(
                f"{item['fatal']} ({where}) — rerun the degrade stage (`dvc repro degrade`): it "
                "rewrites shards that differ from their record; then train again (it resumes)"
            )
        crops = item["crops"]
        if crops is not None:
            streak = 0
            stats.samples += len(crops)
            if len(crops) == batch_size:
                yield torch.as_tensor(crops)
            else:
                short.append(torch.as_tensor(crops))
                if sum(len(c) for c in short) >= batch_size:
                    joined = torch.cat(short)
                    yield joined[:batch_size]
                    short = [joined[batch_size:]] if len(joined) > batch_size else []
        for key, error in item["errors"]:
            stats.corrupt += 1
            stats.corrupt_keys.append(key)
            log.warning("skipping corrupt sample %s: %s", key, error)
            streak += 1
            if streak >= give_up:
                raise ShardError(
                    f"{streak} corrupt samples in a row in {where} (last: {error}) — "
                    "no intact sample left; rerun the degrade stage"
                )
    if short:
        yield torch.cat(short)
