"""Speed and size of the degrade shards (issue 4): the figures behind ``degrade.encoding``.

Prints, on 224×224 QualiCLIP samples (2 crops × 5 levels) rendered from real photos:
  1. per encoding (PNG at compression 1 and 3, lossless WebP at effort 0, raw npy): CPU ms per
     sample to encode and write a tar, to decode (with the CRC check), and bytes per sample;
     QOI too when the `qoi` package is importable (a candidate, not an option: crops only, no tar);
  2. loader throughput in crops/s with 2 DataLoader workers, per encoding;
  3. the degrade stage end to end (`run_degrade`) with 1 and 2 worker processes;
  4. what one training step of the default model consumes (batch 4 at 224 px), for the ratio.

    .venv/bin/python benchmarks/bench_shards.py [--images DIR] [--samples 16] [--variants 2]

Everything runs on one core per process (cv2 single-threaded), so "1 worker" means one core.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from timing import cpu_seconds, load

from qualiclip import shards as S
from qualiclip.sampling import SampleConfig, make_sample

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak" / "images"
CODECS = {"png-1": ("png", 1), "png-3": ("png", 3), "webp": ("webp", None), "npy": ("npy", None)}


def render_samples(images: Path, n: int) -> list:
    """``n`` (crops uint8 (2, 5, 224, 224, 3), levels) pairs over the photos, all distortion types."""
    paths = sorted(images.glob("*.png"))[:n]
    rng = np.random.default_rng(0)
    out = []
    t = time.perf_counter()
    for i in range(n):
        rgb = np.ascontiguousarray(cv2.imread(str(paths[i % len(paths)]))[..., ::-1])
        s = make_sample(rgb, SampleConfig(), rng)
        out.append((s.crops, s.meta["levels"]))
    print(f"sample rendering (distortions, 1 core): {n / (time.perf_counter() - t):.1f} samples/s")
    return out


def encode_records(samples: list, encoding: str) -> list[dict]:
    records = []
    for i, (crops, levels) in enumerate(samples):
        members = S.encode_crops(crops, levels, encoding)
        records.append({"__key__": f"{i:016x}_0000", "json": S.sample_json({"levels": levels}, members), **members})
    return records


def bench_codec(samples: list, name: str, folder: Path) -> dict:
    """Write and decode speed and size of one codec."""
    encoding, level = CODECS[name]
    if level is not None:
        S.PNG_COMPRESSION = level
    t = time.process_time()  # CPU time: on a shared machine wall clock measures the neighbours
    records = encode_records(samples, encoding)
    entry = S.write_shard(folder / "shard-000000.tar", records)
    write = len(samples) / (time.process_time() - t)
    t = time.process_time()
    for r in records:
        S.decode_crops(r)
    read = len(samples) / (time.process_time() - t)
    S.PNG_COMPRESSION = 1
    return {"codec": name, "encoding": encoding, "write": write, "read": read, "bytes": entry["bytes"] / len(samples)}


def write_loader_shards(samples: list, name: str, folder: Path, n_shards: int) -> Path:
    """``n_shards`` copies of the samples as a shard folder with an index (what the loader reads)."""
    encoding, level = CODECS[name]
    S.PNG_COMPRESSION = level or 1
    records = encode_records(samples, encoding)
    S.PNG_COMPRESSION = 1
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for k in range(n_shards):
        recs = [{**r, "__key__": f"{k:08x}{j:08x}_0000"} for j, r in enumerate(records)]
        entries.append(S.write_shard(folder / S.SHARD_PATTERN.format(k), recs))
    (folder / S.INDEX_FILE).write_text(json.dumps({"shards": entries}))
    return folder


def bench_loader(shard_dir: Path, workers: int = 2, batch: int = 4) -> float:
    """Crops per second through `iterate_batches` (one pass, shuffle buffer 64)."""
    from qualiclip.loader import iterate_batches

    t = time.perf_counter()
    crops = sum(
        b.shape[0] * b.shape[1] * b.shape[2]
        for b in iterate_batches(shard_dir, batch, shuffle_buffer=64, num_workers=workers, repeat=False)
    )
    return crops / (time.perf_counter() - t)


def bench_degrade(images: Path, root: Path, variants: int, encoding: str) -> dict[int, tuple[float, float, float]]:
    """(samples/s wall, CPU ms/sample, bytes/sample) of `run_degrade` over the photos with 1 and 2 workers.

    CPU time counts this process and its (reaped) pool workers: on a shared machine the wall-clock
    ratio says how many cores we got, the CPU figure whether a sample costs the same in a worker.
    """
    from qualiclip.degrade import DegradeConfig, run_degrade
    from qualiclip.ingest import IngestConfig, run_ingest

    run_ingest(IngestConfig(sources=(str(images),), val_fraction=0.0, workers=2), root / "ingest", progress=False)
    rates = {}
    for workers in (1, 2):
        cfg = DegradeConfig(variants=variants, samples_per_shard=4, workers=workers, encoding=encoding)
        t, cpu = time.perf_counter(), cpu_seconds()
        out = root / f"shards-{workers}-{encoding}"
        r = run_degrade(cfg, root / "ingest", out, progress=False)
        size = json.loads((out / S.INDEX_FILE).read_text())["total_bytes"]
        rates[workers] = (
            r.samples / (time.perf_counter() - t),
            (cpu_seconds() - cpu) * 1000 / r.samples,
            size / r.samples,
        )
    return rates


def bench_train_step(reps: int = 5) -> float:
    """Seconds of one optimisation step of the default model, batch 4 at 224 px (median)."""
    import torch

    from qualiclip.model import ModelConfig
    from qualiclip.train import DistInfo, TrainConfig, build_trainer, optimize

    cfg = TrainConfig(batch_size=4, device="cpu")
    trainer = build_trainer(cfg, ModelConfig(), DistInfo())
    batch = torch.randint(0, 256, (4, 2, 5, 224, 224, 3), dtype=torch.uint8)
    optimize(trainer, batch, cfg)  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        optimize(trainer, batch, cfg)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def report_codecs(samples: list, root: Path) -> None:
    for name in CODECS:  # warm-up: first-call imports (webdataset) and codec initialisation
        bench_codec(samples[:1], name, root)
    print(
        f"\n{'codec':8} {'write ms':>9} {'read ms':>8} {'w+r ms':>7} {'KiB/sample':>11} {'loader crops/s (2 workers)':>27}"
    )
    for name in CODECS:
        r = bench_codec(samples, name, root)
        loader = bench_loader(write_loader_shards(samples, name, root / f"loader-{name}", 8))
        w, rd = 1e3 / r["write"], 1e3 / r["read"]
        print(f"{name:8} {w:9.1f} {rd:8.1f} {w + rd:7.1f} {r['bytes'] / 1024:11.0f} {loader:27.0f}")
    qoi = bench_qoi(samples)
    if qoi:
        print(f"{'qoi':8} {qoi[0]:9.1f} {qoi[1]:8.1f} {sum(qoi[:2]):7.1f} {qoi[2] / 1024:11.0f} {'(crops only)':>27}")
    print("(write/read: CPU ms per sample of 10 crops on one core; loader: wall clock)")


def bench_qoi(samples: list) -> tuple[float, float, float] | None:
    """(encode ms, decode ms, bytes) per sample with the `qoi` package, or None without it."""
    try:
        import qoi
    except ImportError:
        return None
    crops = [c for crops, _ in samples for c in crops.reshape(-1, *crops.shape[-3:])]
    qoi.decode(qoi.encode(crops[0]))
    t = time.process_time()
    blobs = [qoi.encode(np.ascontiguousarray(c)) for c in crops]
    write = time.process_time() - t
    t = time.process_time()
    decoded = [qoi.decode(b) for b in blobs]
    read = time.process_time() - t
    assert all(np.array_equal(d, c) for d, c in zip(decoded, crops))  # lossless
    n = len(samples)
    return 1e3 * write / n, 1e3 * read / n, sum(map(len, blobs)) / n


def report_degrade(images: Path, root: Path, variants: int, encoding: str) -> None:
    rates = bench_degrade(images, root, variants, encoding)
    for w, (rate, cpu, size) in rates.items():
        print(
            f"run_degrade ({encoding}), {w} worker(s): {rate:.2f} samples/s, {cpu:.0f} CPU ms/sample, "
            f"{size / 1024:.0f} KiB/sample"
        )
    startup = pool_startup()
    n = len(list((root / f"shards-1-{encoding}").glob("shard-*.tar"))) * 4
    t1 = n / rates[1][0]
    print(
        f"2 workers / 1 worker: {rates[2][0] / rates[1][0]:.2f}x wall; pool start-up {startup:.1f} s; "
        f"on 2 free cores this run would give {t1 / (startup + t1 / 2):.2f}x, "
        f"a run of 10x the samples {10 * t1 / (startup + 5 * t1):.2f}x"
    )


def _warm(_: int) -> None:
    import qualiclip.degrade
    import qualiclip.distortions.registry  # noqa: F401  (what a shard job imports first)


def pool_startup() -> float:
    """Seconds to start the degrade stage's 2-process spawn pool and import the job's modules."""
    import multiprocessing as mp

    from qualiclip.degrade import limit_threads

    t = time.perf_counter()
    with mp.get_context("spawn").Pool(2, initializer=limit_threads) as pool:
        pool.map(_warm, range(2), chunksize=1)
    return time.perf_counter() - t


def report_train() -> None:
    step = bench_train_step()
    print(f"training step (default model, batch 4 at 224 px): {step * 1000:.0f} ms -> consumes {40 / step:.0f} crops/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--samples", type=int, default=16, help="samples rendered for the codec comparison")
    p.add_argument("--variants", type=int, default=2, help="samples per photo in the end-to-end run")
    p.add_argument("--encoding", default="webp", help="encoding of the end-to-end run")
    p.add_argument("--only", choices=["codecs", "degrade", "train"], help="run one part")
    args = p.parse_args()
    cv2.setNumThreads(1)
    print(f"at start: {load()}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "codecs"):
            report_codecs(render_samples(args.images, args.samples), Path(tmp))
        if args.only in (None, "degrade"):
            report_degrade(args.images, Path(tmp), args.variants, args.encoding)
    if args.only in (None, "train"):
        report_train()


if __name__ == "__main__":
    main()
