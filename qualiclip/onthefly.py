"""Training samples computed on the fly (``train.source: on_the_fly``): the degrade plan run in
the loader workers instead of read from shards (docs/training.md, "Samples on the fly").

The degrade stage renders each planned sample (`degrade.render_sample`), encodes it losslessly
into its shard, and training decodes it again. Here a loader worker renders the same sample
where training needs it and skips the encoding, the shard and the decoding. The stream is the
one the shards of the same ingest output, degrade params and seed give, sample for sample and
byte for byte, for any number of ranks and workers:

- the units the loader shuffles per epoch and splits between ranks and workers are the planned
  shards (`degrade.plan_jobs`: the same samples, in the same order), so `loader.epoch_shards`,
  ``split_by_node`` and ``split_by_worker`` give every worker the samples it reads from shards;
- a unit expands into references (image id, variant) that pass the same seeded shuffle buffer,
  whose order depends on the number of items alone, not on what they hold; rendering comes
  after the buffer, which therefore holds references, not crops;
- a sample's pixels depend only on (degrade params, seed, image, variant), and the shard
  encodings are lossless.

The data version of such a run is the degrade plan's digest (`degrade.plan_digest`: format
version, degrade params, every image's id and sha256), not a shard index digest.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .degrade import ShardJob, limit_threads, plan_digest, plan_jobs, plan_rows, render_sample, sample_key
from .ingest import images_dir
from .loader import LoaderStats, stream_batches
from .schema import DegradeConfig


@dataclass(frozen=True)
class SamplePlan:
    """What an on-the-fly run trains on: the degrade plan of an ingest output."""

    cfg: DegradeConfig
    images_dir: str  # absolute: loader workers may run in another working folder
    jobs: tuple[ShardJob, ...]  # the shards `qualiclip degrade` would write, in index order
    digest: str  # `degrade.plan_digest`: equal digests, equal samples

    @property
    def total_samples(self) -> int:
        return sum(len(j.samples) for j in self.jobs)

    @property
    def where(self) -> str:
        """How errors name this data."""
        return f"the degrade plan of {Path(self.images_dir).parent} (train.source: on_the_fly)"

    def batches(
        self,
        batch_size: int,
        *,
        shuffle_buffer: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        repeat: bool = True,
        stats: LoaderStats | None = None,
        pin_memory: bool = False,
    ) -> Iterator[torch.Tensor]:
        """`loader.iterate_batches` over the samples of the plan: the batches the shards give."""
        yield from stream_batches(
            units(self),
            self.where,
            batch_size,
            shuffle_buffer=shuffle_buffer,
            num_workers=num_workers,
            seed=seed,
            repeat=repeat,
            stats=stats,
            pin_memory=pin_memory,
            expand=expand_jobs,
            decode=functools.partial(render, cfg=self.cfg, images_dir=self.images_dir),
        )


def plan_samples(ingest_dir: str | os.PathLike, cfg: DegradeConfig) -> SamplePlan:
    """The plan `qualiclip degrade` would run on ``ingest_dir`` with ``cfg``, checked as it checks it."""
    rows = plan_rows(cfg, Path(ingest_dir))
    images = str(Path(images_dir(Path(ingest_dir))).resolve())
    return SamplePlan(cfg, images, plan_jobs([r["id"] for r in rows], cfg), plan_digest(cfg, rows))


def units(plan: SamplePlan) -> list[dict]:
    """The loader's units (what it shuffles per epoch and splits): one per planned shard."""
    return [{"url": j.name, "samples": len(j.samples), "jobs": j.samples} for j in plan.jobs]


def expand_jobs(src: Iterator[dict]) -> Iterator[dict]:
    """Units -> one reference per sample, in shard order (the place of `loader.expand_shards`)."""
    for unit in src:
        for image_id, variant in unit["jobs"]:
            yield {"__key__": sample_key(image_id, variant), "image_id": image_id, "variant": variant}


def render(ref: dict, cfg: DegradeConfig, images_dir: str) -> dict:
    """A reference -> ``{"key", "crops": uint8 (2, L, H, W, 3)}`` (the place of `loader.decode_sample`).

    The crops come in ascending level order, as `shards.decode_crops` returns them. An image that
    cannot be read raises: degrade would have failed on it too, so training stops instead of
    skipping samples a shard run would have.
    """
    if torch.utils.data.get_worker_info() is not None:  # a loader worker: one per core, like a degrade worker
        limit_threads()
    crops, meta = render_sample(ref["image_id"], ref["variant"], cfg, images_dir)
    order = np.argsort(meta["levels"], kind="stable")
    if (order != np.arange(len(order))).any():
        crops = crops[:, order]
    return {"key": ref["__key__"], "crops": crops}
