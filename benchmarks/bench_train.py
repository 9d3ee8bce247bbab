"""Training throughput: crops/s of full optimisation steps (forward, losses, backward, AdamW).

CPU: the tiny model at 64 px, compute only (one batch reused) and fed by the shard loader; then
the small model (qualiclip-small-rn) at 160 px, compute only, in fp32 and bf16 autocast, with and
without channels_last (measured 1.6x faster in bf16 on an AMX-BF16 Xeon; other CPUs unmeasured).
CUDA (where present): RN50 at 224 px, bf16 autocast + channels_last, fed by the shard loader,
at batch sizes of 16-64 samples (one sample = 2 overlapping crops × 5 levels = 10 crops).

    python benchmarks/bench_train.py                       # builds small shards in a temp folder
    python benchmarks/bench_train.py --shards data/shards  # CUDA part on your own 224 px shards
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch

from qualiclip.loader import LoaderStats, iterate_batches
from qualiclip.model import ModelConfig
from qualiclip.shards import INDEX_FILE
from qualiclip.train import DistInfo, TrainConfig, build_trainer, optimize


def build_shards(root: Path, crop: int, variants: int, workers: int) -> Path:
    """Shards from scikit-image's photos (offline), ``variants`` samples per photo; reused when present."""
    from qualiclip.degrade import DegradeConfig, run_degrade
    from qualiclip.ingest import IngestConfig, run_ingest
    from qualiclip.sampling import SampleConfig

    out = root / f"shards{crop}x{variants}"
    if (out / INDEX_FILE).exists():
        return out

    run_ingest(
        IngestConfig(sources=("skimage",), min_size=crop, val_fraction=0.0, workers=workers),
        root / "ingest",
        progress=False,
    )
    cfg = DegradeConfig(variants=variants, samples_per_shard=16, workers=workers, sample=SampleConfig(crop=crop))
    run_degrade(cfg, root / "ingest", out, progress=False)
    return out


def measure(trainer, cfg: TrainConfig, batches, steps: int, warmup: int) -> float:
    """Crops per second over ``steps`` optimisation steps after ``warmup`` untimed ones."""
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    for batch in itertools.islice(batches, warmup):
        optimize(trainer, batch, cfg)
    sync()
    start, crops = time.perf_counter(), 0
    for batch in itertools.islice(batches, steps):
        optimize(trainer, batch, cfg)
        crops += batch.shape[0] * batch.shape[1] * batch.shape[2]
    sync()
    return crops / (time.perf_counter() - start)


def loader(shards: Path, cfg: TrainConfig):
    return iterate_batches(
        shards,
        cfg.batch_size,
        shuffle_buffer=cfg.shuffle_buffer,
        num_workers=cfg.num_workers,
        seed=0,
        stats=LoaderStats(),
        pin_memory=cfg.device == "cuda",
    )


def bench_cpu(shards: Path, steps: int, threads: int) -> None:
    torch.set_num_threads(threads)
    cfg = TrainConfig(batch_size=4, device="cpu", num_workers=1, shuffle_buffer=16)
    trainer = build_trainer(cfg, ModelConfig(), DistInfo())
    batch = next(loader(shards, cfg))
    compute = measure(trainer, cfg, itertools.repeat(batch), steps, warmup=2)
    fed = measure(trainer, cfg, loader(shards, cfg), steps, warmup=2)
    print(
        f"cpu  tiny@64px  batch {cfg.batch_size} samples ({cfg.batch_size * 10} crops), {threads} threads: "
        f"compute only {compute:,.0f} crops/s; with shard loader {fed:,.0f} crops/s"
    )


def bench_cpu_precision(steps: int, threads: int, crop: int = 160) -> None:
    """The small model's compute-only step rate on CPU for each precision x memory layout."""
    torch.set_num_threads(threads)
    batch = torch.randint(
        0, 256, (4, 2, 5, crop, crop, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    for precision, channels_last in itertools.product(("fp32", "bf16"), (False, True)):
        cfg = TrainConfig(batch_size=4, device="cpu", precision=precision, channels_last=channels_last)
        trainer = build_trainer(cfg, ModelConfig(name="qualiclip-small-rn"), DistInfo())
        rate = measure(trainer, cfg, itertools.repeat(batch), steps, warmup=2)
        print(
            f"cpu  small@{crop}px {precision}{' channels_last' if channels_last else ''}, batch 4 samples (40 crops), "
            f"{threads} threads: compute only {rate:,.0f} crops/s = {40 / rate:.2f} s/step",
            flush=True,
        )


def loader_rate(shards: Path, cfg: TrainConfig, batches: int) -> float:
    """Crops per second the shard loader alone delivers (decode, CRC check, batching), after one warm-up batch."""
    it = loader(shards, cfg)
    next(it)
    start, crops = time.perf_counter(), 0
    for batch in itertools.islice(it, batches):
        crops += batch.shape[0] * batch.shape[1] * batch.shape[2]
    return crops / (time.perf_counter() - start)


def bench_cuda(shards: Path, steps: int, batch_sizes: list[int], workers: int, compile_: bool) -> None:
    cfg = TrainConfig(batch_size=max(batch_sizes), device="cuda", num_workers=workers, shuffle_buffer=64)
    print(
        f"shard loader alone, {workers} workers, batch {cfg.batch_size}: "
        f"{loader_rate(shards, cfg, steps):,.0f} crops/s",
        flush=True,
    )
    for b in batch_sizes:
        cfg = TrainConfig(
            batch_size=b,
            device="cuda",
            num_workers=workers,
            shuffle_buffer=64,
            precision="bf16",
            channels_last=True,
            compile=compile_,
        )
        trainer = build_trainer(cfg, ModelConfig(name="RN50"), DistInfo())
        batches = loader(shards, cfg)
        warmup = 5 if not compile_ else 15
        compute = measure(trainer, cfg, itertools.repeat(next(batches)), steps, warmup)
        fed = measure(trainer, cfg, batches, steps, warmup=2)
        mem = torch.cuda.max_memory_allocated() / 2**30
        print(
            f"cuda RN50@224 bf16 channels_last{' compiled' if compile_ else ''} batch {b} samples ({b * 10} crops), "
            f"{workers} loader workers: with shard loader {fed:,.0f} crops/s = {fed / 10:,.1f} samples/s; "
            f"compute only {compute:,.0f} crops/s; peak {mem:.1f} GiB  [{torch.cuda.get_device_name()}]",
            flush=True,
        )
        del trainer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, help="224 px shards for the CUDA part (default: built from scikit-image)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[16, 32, 64])
    p.add_argument("--workers", type=int, default=8, help="loader workers for the CUDA part")
    p.add_argument("--compile", action="store_true", help="also torch.compile the encoder (CUDA part)")
    p.add_argument("--skip-cpu", action="store_true")
    p.add_argument(
        "--work", type=Path, help="folder for the built shards, reused when present (default: a temp folder)"
    )
    args = p.parse_args()
    tmp = args.work or Path(tempfile.mkdtemp(prefix="bench_train-"))
    if not args.skip_cpu:
        bench_cpu(build_shards(tmp, crop=64, variants=4, workers=2), args.steps, args.threads)
        bench_cpu_precision(args.steps, args.threads)
    if torch.cuda.is_available():
        shards = args.shards or build_shards(tmp, crop=224, variants=16, workers=args.workers)
        bench_cuda(shards, args.steps, args.batch_sizes, args.workers, args.compile)
    else:
        print("cuda: not available here; the RN50 figures need a GPU")


if __name__ == "__main__":
    main()
