"""Samples on the fly vs shards (issue 28, docs/scale.md §4): CPU per sample of each way to feed training.

Over real photos (Kodak) with the default sample params (224 px crops, all 24 types, lossless WebP),
interleaved runs, each over the same plan:

  - ``degrade``:    `run_degrade` with W worker processes (render, encode, write the shards);
  - ``render``:     `degrade.render_sample` alone, in this process: the floor both ways pay;
  - ``on the fly``: one pass of the on-the-fly loader (`onthefly.SamplePlan.batches`), W workers;
  - ``shards``:     one pass of the shard loader (`loader.iterate_batches`) over degrade's output, W workers;

for W = 1 and 2. CPU time counts every process (the loader's main process and its workers, the
degrade pool), so the figures hold on a shared machine; wall-clock rates are printed with the
load average. Every on-the-fly pass is checked equal, sample for sample, to the shard pass.
The last lines turn the medians into the figures of docs/scale.md for 1M photos.

    nice -n 10 .venv/bin/python benchmarks/bench_onthefly.py [--variants 4] [--reps 3]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

from bench_scale import CROPS_PER_SAMPLE, H100_CROPS_PER_S, PHOTOS
from bench_shards import DEFAULT_IMAGES
from timing import cpu_everywhere, load, single_thread

from qualiclip.degrade import DegradeConfig, render_sample, run_degrade
from qualiclip.ingest import MANIFEST_FILE, IngestConfig, images_dir, run_ingest
from qualiclip.loader import iterate_batches
from qualiclip.onthefly import SamplePlan, plan_samples

BATCH = 4
SHUFFLE = 64


def one_pass(batches) -> tuple[int, float]:
    """(samples, seconds to the first batch) of one pass."""
    t, first, n = time.perf_counter(), None, 0
    for b in batches:
        first = first if first is not None else time.perf_counter() - t
        n += len(b)
    return n, first or 0.0


def sample_digests(batches) -> list[str]:
    return [hashlib.sha256(s.numpy().tobytes()).hexdigest() for b in batches for s in b]


def plan_seconds(ingest: Path, root: Path, photos: int, cfg: DegradeConfig) -> float:
    """Seconds `plan_samples` takes for a manifest of ``photos`` rows (synthetic ids; no image is read)."""
    with open(ingest / MANIFEST_FILE, newline="") as f:
        real = list(csv.DictReader(f))
    folder = root / "synthetic"
    folder.mkdir()
    with open(folder / MANIFEST_FILE, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(real[0]))
        w.writeheader()
        for k in range(photos):
            w.writerow({**real[k % len(real)], "id": f"{k:016x}", "split": "train"})
    t = time.perf_counter()
    plan = plan_samples(folder, cfg)
    seconds = time.perf_counter() - t
    assert plan.total_samples == photos * cfg.variants
    return seconds


def render_all(plan: SamplePlan) -> None:
    for job in plan.jobs:
        for image_id, variant in job.samples:
            render_sample(image_id, variant, plan.cfg, plan.images_dir)


def measure(run) -> tuple[float, float, object]:
    """(CPU s of every process, wall s, result) of one call."""
    t, cpu = time.perf_counter(), cpu_everywhere()
    out = run()
    return cpu_everywhere() - cpu, time.perf_counter() - t, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--variants", type=int, default=4, help="samples per photo in the measured runs")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker processes (degrade pool, loader)")
    p.add_argument("--plan-photos", type=int, default=100_000, help="photos of the synthetic manifest planned")
    args = p.parse_args()
    # one thread per process, as in degrade's pool workers and the loader's workers; and OpenCV's
    # thread pool, once started in this process, does not survive the fork of a loader worker
    single_thread()
    print(f"start: {load()}")
    cfg = DegradeConfig(variants=args.variants, samples_per_shard=4)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ingest = root / "ingest"
        run_ingest(IngestConfig(sources=(str(args.images),), val_fraction=0.0, workers=1), ingest, progress=False)
        plan = plan_samples(ingest, cfg)
        n = plan.total_samples
        photo_bytes = sum(f.stat().st_size for f in Path(images_dir(ingest)).iterdir()) / (n // args.variants)
        plan_s = plan_seconds(ingest, root, args.plan_photos, DegradeConfig()) / args.plan_photos  # per photo
        print(f"plan_samples: {plan_s * 1e6:.0f} µs per photo × 24 variants ({args.plan_photos:,} photos; {load()})")
        shards = root / "shards"
        run_degrade(cfg, ingest, shards, progress=False)  # warm-up (page cache, imports); the shards read below
        shard_bytes = sum(f.stat().st_size for f in shards.glob("shard-*.tar")) / n
        for w in args.workers:  # untimed: the on-the-fly stream is the shards' stream, sample for sample
            options = dict(shuffle_buffer=SHUFFLE, num_workers=w, repeat=False)
            assert sample_digests(plan.batches(BATCH, **options)) == sample_digests(
                iterate_batches(shards, BATCH, **options)
            ), f"W={w}: the on-the-fly samples differ from the shards'"
            print(f"W={w}: on the fly = shards, {n} samples byte for byte in the same order")
        runs = {"render": lambda: render_all(plan)}
        for w in args.workers:
            runs[f"degrade W={w}"] = lambda w=w: run_degrade(
                DegradeConfig(variants=args.variants, samples_per_shard=4, workers=w),
                ingest,
                root / f"out-{w}",
                progress=False,
            )
            runs[f"on the fly W={w}"] = lambda w=w: one_pass(
                plan.batches(BATCH, shuffle_buffer=SHUFFLE, num_workers=w, repeat=False)
            )
            runs[f"shards W={w}"] = lambda w=w: one_pass(
                iterate_batches(shards, BATCH, shuffle_buffer=SHUFFLE, num_workers=w, repeat=False)
            )
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        rate: dict[str, list[float]] = {k: [] for k in runs}
        first: dict[str, list[float]] = {k: [] for k in runs}
        for rep in range(args.reps):
            for name, run in runs.items():
                c, wall, out = measure(run)
                w = int(name.rsplit("=", 1)[1]) if "=" in name else 1
                cpu[name].append(c / n * 1000)
                rate[name].append(n / wall / w)
                if name.startswith(("on the fly", "shards")):
                    samples, to_first = out
                    assert samples == n, f"{name}: {samples} samples, planned {n}"
                    first[name].append(to_first)
                print(
                    f"  rep {rep} {name:15} {cpu[name][-1]:5.1f} CPU ms/sample {rate[name][-1]:5.1f} samples/s/worker ({load()})"
                )
        med = {k: statistics.median(v) for k, v in cpu.items()}
        print(f"\n{n} samples ({cfg.sample.crop} px, {cfg.encoding} shards, batch {BATCH}), medians of {args.reps}:")
        for name in runs:
            line = (
                f"  {name:15} {med[name]:5.1f} CPU ms/sample ({1000 / med[name]:5.1f} samples/CPU-s), "
                f"{statistics.median(rate[name]):5.1f} samples/s per worker (wall)"
            )
            if first[name]:
                line += f", first batch after {statistics.median(first[name]):.2f} s"
            print(line)
        own = med[f"degrade W={args.workers[0]}"]  # W=1: in this process, no pool to start
        for w in args.workers:
            fly = med[f"on the fly W={w}"]
            print(
                f"  W={w}: on the fly / degrade's own per-sample CPU (W={args.workers[0]}) = {fly / own:.2f} "
                f"(target <= 1.10); / degrade W={w} = {fly / med[f'degrade W={w}']:.2f}; "
                f"/ render alone = {fly / med['render']:.2f}; shards / on the fly = {med[f'shards W={w}'] / fly:.2f}"
            )
        extrapolate(
            med[f"degrade W={args.workers[0]}"] / 1000,
            med[f"on the fly W={args.workers[-1]}"] / 1000,
            med[f"shards W={args.workers[-1]}"] / 1000,
            shard_bytes,
            photo_bytes,
            plan_s,
            statistics.median(first[f"on the fly W={args.workers[-1]}"]),
        )
    print(f"end: {load()}")


def extrapolate(
    degrade_s: float, fly_s: float, read_s: float, shard_bytes: float, photo_bytes: float, plan_s: float, first_s: float
) -> None:
    """docs/scale.md: both options for 1M photos × the default variants, one H100 at its measured feed.
    ``plan_s``: seconds of planning per photo (24 variants); the rest per sample."""
    variants = DegradeConfig().variants
    samples = PHOTOS * variants
    feed = H100_CROPS_PER_S / CROPS_PER_SAMPLE  # samples/s one H100 eats
    print(f"\n1M photos × {variants} variants = {samples / 1e6:.0f} M samples; one H100 eats {feed:.0f} samples/s:")
    photos = PHOTOS * photo_bytes
    print(f"  {'':28} {'shards':>24} {'on the fly':>24}")
    print(
        f"  {'storage':28} {(samples * shard_bytes + photos) / 1e12:>21.1f} TB {photos / 1e12:>21.2f} TB"
        f"   (ingested photos {photo_bytes / 1e6:.2f} MB each, as measured; shards {shard_bytes / 1024:.0f} KiB/sample)"
    )
    print(
        f"  {'CPU before the first step':28} {samples * degrade_s / 3600:>15,.0f} core-hours {plan_s * PHOTOS:>17.0f} s"
        "   (degrade; on the fly: planning)"
    )
    print(
        f"  {'CPU per epoch (loader)':28} {samples * read_s / 3600:>15,.0f} core-hours "
        f"{samples * fly_s / 3600:>15,.0f} core-hours"
    )
    print(f"  {'cores to feed one H100':28} {feed * read_s:>24.1f} {feed * fly_s:>24.1f}")
    for cores in (16, 64):
        print(
            f"  {f'first step, {cores} cores':28} {samples * degrade_s / cores / 3600:>22.1f} h "
            f"{plan_s * PHOTOS + first_s:>21.0f} s   (degrade on {cores} cores; on the fly: planning + first batch)"
        )


if __name__ == "__main__":
    main()
