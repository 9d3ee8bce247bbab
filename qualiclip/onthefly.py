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
- a unit expands into its samples, rendered in shard order (as degrade renders them: each
  image is decoded once for its consecutive variants, `ingest.load_image`'s cache), which then
  pass the same seeded shuffle buffer, whose order depends on the number of items alone, not
  on what they hold (the buffer holds rendered crops, ~1.5 MB a sample at 224 px, where the
  shard loader holds encoded ones);
- a sample's pixels depend only on (degrade params, seed, image, variant), and the shard
  encodings are lossless.

The data version of such a run is the degrade plan's digest (`identity.plan_digest`: format
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

from .degrade import ShardJob, limit_threads, plan_jobs, plan_rows, render_sample, sample_key
from .identity import plan_digest
from .ingest import images_dir
from .loader import LoaderStats, stream_batches
from .schema import DegradeConfig
from .shards import FORMAT_VERSION


@dataclass(frozen=True)
class SamplePlan:
    """What an on-the-fly run trains on: the degrade plan of an ingest output."""

    cfg: DegradeConfig
    images_dir: str  # absolute: loader workers may run in another working folder
    jobs: tuple[ShardJob, ...]  # the shards `qualiclip degrade` would write, in index order
    digest: str  # `identity.plan_digest`: equal digests, equal samples

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
            expand=functools.partial(expand_jobs, cfg=self.cfg, images_dir=self.images_dir),
            decode=rendered,
        )


def plan_samples(ingest_dir: str | os.PathLike, cfg: DegradeConfig) -> SamplePlan:
    """The plan `qualiclip degrade` would run on ``ingest_dir`` with ``cfg``, checked as it checks it."""
    rows = plan_rows(cfg, Path(ingest_dir))
    images = str(Path(images_dir(Path(ingest_dir))).resolve())
    return SamplePlan(cfg, images, plan_jobs([r["id"] for r in rows], cfg), plan_digest(cfg, rows, FORMAT_VERSION))


def units(plan: SamplePlan) -> list[dict]:
    """The loader's units (what it shuffles per epoch and splits): one per planned shard."""
    return [{"url": j.name, "samples": len(j.samples), "jobs": j.samples} for j in plan.jobs]


def expand_jobs(src: Iterator[dict], cfg: DegradeConfig, images_dir: str) -> Iterator[dict]:
    """Units -> their samples rendered, in shard order (the place of `loader.expand_shards`)."""
    if torch.utils.data.get_worker_info() is not None:  # a loader worker: one per core, like a degrade worker
        limit_threads()
    for unit in src:
        for image_id, variant in unit["jobs"]:
            yield {"__key__": sample_key(image_id, variant), "crops": render(image_id, variant, cfg, images_dir)}


def render(image_id: str, variant: int, cfg: DegradeConfig, images_dir: str) -> np.ndarray:
    """The crops of one planned sample, uint8 (2, L, H, W, 3) in ascending level order, as
    `shards.decode_crops` returns them from a shard.

    An image that cannot be read raises: degrade would have failed on it too, so training stops
    instead of skipping samples a shard run would have.
    """
    crops, meta = render_sample(image_id, variant, cfg, images_dir)
    order = np.argsort(meta["levels"], kind="stable")
    return crops if (order == np.arange(len(order))).all() else crops[:, order]


def rendered(sample: dict) -> dict:
    """A rendered sample as the batching step takes it (the place of `loader.decode_sample`)."""
    return {"key": sample["__key__"], "crops": sample["crops"]}
