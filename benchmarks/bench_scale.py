"""The figures of docs/scale.md (issue 17): what generating and streaming shards costs, measured here,
and what that makes of 1M pristine photos.

  1. degrade: CPU-seconds and bytes per sample of `run_degrade` with the default sample params
     (224 px crops, all 24 types, lossless WebP) over real photos (Kodak), one process;
  2. dask: samples/s of the degrade flow on Dask — a temporary LocalCluster (``--dask local``) and
     an already running one (``--dask tcp://…``) — against `run_degrade`'s process pool, the same
     params and number of worker processes, runs interleaved; and the shard jobs on the running
     cluster without Prefect (what the flow's orchestration costs); every run's bytes are checked equal;
  3. loader: crops/s of `iterate_batches` (one pass, sha256 check included) from an S3 server on
     127.0.0.1 (``moto_server``, its own process) against the same shards on local disk, interleaved;
  4. the extrapolation to 1M photos: shard storage, generation core-hours, GPU-hours per epoch on
     one H100 at the crops/s measured in an earlier session (docs/training.md).

    .venv/bin/python benchmarks/bench_scale.py [--variants 4] [--workers 2] [--reps 3] [--only degrade|dask|loader]

Wall-clock figures depend on what else runs on the machine: the load average is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_shards import DEFAULT_IMAGES
from timing import cpu_everywhere, cpu_seconds, load

from qualiclip.degrade import (
    DegradeConfig,
    degrade_lock,
    finalize_degrade,
    limit_threads,
    plan_degrade,
    run_degrade,
    write_one_shard,
)
from qualiclip.distortions.registry import N_LEVELS
from qualiclip.ingest import IngestConfig, run_ingest
from qualiclip.shards import read_index

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = 1_000_000  # the corpus of the extrapolation
H100_CROPS_PER_S = 4437  # RN50, compile, batch 32, fed by the loader: measured on a lent H100 (docs/training.md)
CROPS_PER_SAMPLE = 2 * N_LEVELS  # two overlapping crops × the levels


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.name != ".degrade.lock"}


# ---------------------------------------------------------------------------------------------
# 1. degrade: CPU and bytes per sample


def bench_degrade(ingest: Path, root: Path, cfg: DegradeConfig) -> tuple[float, float, Path]:
    """(CPU s per sample, bytes per sample, the shard folder) of one in-process `run_degrade`."""
    out = root / "degrade"
    cpu = cpu_seconds()
    result = run_degrade(cfg, ingest, out, progress=False)
    cpu = (cpu_seconds() - cpu) / result.samples
    size = result.bytes / result.samples
    print(
        f"degrade: {result.samples} samples, {cpu * 1000:.0f} CPU ms/sample, {size / 1024:.0f} KiB/sample "
        f"({cfg.sample.crop} px, {cfg.encoding}, {result.shards} shards; {load()})"
    )
    return cpu, size, out


# ---------------------------------------------------------------------------------------------
# 2. Dask vs the process pool


def bench_dask(ingest: Path, root: Path, cfg: DegradeConfig, reps: int) -> None:
    """samples/s of the pool, the flow on a temporary LocalCluster, and on a running one, interleaved."""
    from distributed import Client, LocalCluster

    sys.path.insert(0, str(ROOT))  # flows/ is imported from the repository root
    from flows.degrade_shards import api_for_dask, dask_runner, degrade_shards_flow, local_cluster_kwargs

    params = root / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {"degrade": {"variants": cfg.variants, "samples_per_shard": cfg.samples_per_shard, "workers": cfg.workers}}
        )
    )

    def flow_on(address: str):
        run = degrade_shards_flow.with_options(task_runner=dask_runner(address, cfg.workers))
        return lambda out: run(str(params), str(ingest), str(out))

    # one Prefect server for the flow and the workers, as `python -m flows.degrade_shards --dask local` runs
    with api_for_dask("local"), LocalCluster(**local_cluster_kwargs(cfg.workers)) as cluster, Client(cluster) as client:
        degrade_shards_flow(str(params), str(ingest), str(root / "warm"))  # first flow run: untimed
        rates, cpus = interleave(
            {
                "pool": lambda out: run_degrade(cfg, ingest, out, progress=False),
                "dask local": flow_on("local"),
                "dask running": flow_on(cluster.scheduler_address),
                "dask, no flow": lambda out: degrade_on_dask(client, cfg, ingest, out),
            },
            root,
            reps,
        )
    pool = statistics.median(rates["pool"])
    for name, values in rates.items():
        print(
            f"dask: {name:13} median {statistics.median(values):6.2f} samples/s "
            f"({statistics.median(values) / pool:.2f}x the pool; runs {', '.join(f'{v:.2f}' for v in values)}), "
            f"median {statistics.median(cpus[name]):.0f} CPU ms/sample"
        )


def degrade_on_dask(client, cfg: DegradeConfig, ingest: Path, out: Path) -> None:
    """The library's three pieces with the shard jobs on Dask directly: what Prefect's orchestration costs."""
    client.run(limit_threads)
    with degrade_lock(out):
        plan = plan_degrade(cfg, ingest, out)
        futures = client.map(
            write_one_shard, plan.pending, cfg=cfg, images_dir=plan.images_dir, out_dir=plan.out_dir, pure=False
        )
        finalize_degrade(plan, client.gather(futures))


def idle_cpu_rate(seconds: float = 10.0) -> float:
    """CPU seconds per second that the idle servers (Prefect's, the running cluster) burn anyway."""
    t, cpu = time.perf_counter(), cpu_everywhere()
    time.sleep(seconds)
    return (cpu_everywhere() - cpu) / (time.perf_counter() - t)


def interleave(runs: dict, root: Path, reps: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(samples/s, CPU ms/sample net of the idle servers' background) of each run, ``reps`` rounds of
    one run each, every output checked equal to the first."""
    idle = idle_cpu_rate()
    print(f"  idle background (Prefect server, running cluster): {idle * 1000:.0f} CPU ms/s")
    rates: dict[str, list[float]] = {name: [] for name in runs}
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    reference = None
    for rep in range(reps):
        for name, run in runs.items():
            out = root / f"{name.replace(' ', '-')}-{rep}"
            t, cpu = time.perf_counter(), cpu_everywhere()
            run(out)
            samples, wall = read_index(out)["total_samples"], time.perf_counter() - t
            rates[name].append(samples / wall)
            cpus[name].append((cpu_everywhere() - cpu - idle * wall) * 1000 / samples)
            reference = reference or digests(out)
            assert digests(out) == reference, f"{name} wrote other bytes"
            print(
                f"  rep {rep} {name:13} {rates[name][-1]:6.2f} samples/s {cpus[name][-1]:5.0f} CPU ms/sample ({load()})"
            )
    return rates, cpus


# ---------------------------------------------------------------------------------------------
# 3. The loader from an S3 server vs local disk


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3_server() -> tuple[subprocess.Popen, str]:
    """``moto_server`` on a free loopback port, in its own process; returns it and its endpoint."""
    import urllib.request

    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def one_pass(where: str | Path, workers: int, batch: int) -> float:
    """crops/s of one pass over every shard (epoch 0: each shard's sha256 checked too)."""
    from qualiclip.loader import iterate_batches

    t = time.perf_counter()
    crops = sum(
        b.shape[0] * b.shape[1] * b.shape[2]
        for b in iterate_batches(where, batch, shuffle_buffer=64, num_workers=workers, repeat=False)
    )
    return crops / (time.perf_counter() - t)


def bench_loader(shards: Path, reps: int, workers: int, batch: int = 4) -> dict[str, float]:
    """Median crops/s from local disk and from the S3 server, passes interleaved."""
    import fsspec

    proc, endpoint = start_s3_server()
    try:
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
        )
        fs = fsspec.filesystem("s3", use_listings_cache=False)
        fs.mkdir("bench")
        for p in sorted(shards.iterdir()):
            fs.put_file(str(p), f"bench/shards/{p.name}")
        places = {"local disk": shards, "S3 server": "s3://bench/shards"}
        rates: dict[str, list[float]] = {name: [] for name in places}
        for where in places.values():  # warm-up: page cache, first imports, the server's first requests
            one_pass(where, workers, batch)
        for rep in range(reps):
            for name, where in places.items():
                rates[name].append(one_pass(where, workers, batch))
                print(f"  rep {rep} {name:10} {rates[name][-1]:6.0f} crops/s ({load()})")
    finally:
        proc.kill()
        proc.wait()
    medians = {name: statistics.median(v) for name, v in rates.items()}
    for name, values in rates.items():
        print(
            f"loader ({workers} workers, batch {batch}): {name:10} median {medians[name]:6.0f} crops/s "
            f"(runs {', '.join(f'{v:.0f}' for v in values)})"
        )
    return medians


# ---------------------------------------------------------------------------------------------
# 4. 1M photos


def extrapolate(cpu_s: float, size: float, variants: int) -> None:
    samples = PHOTOS * variants
    print(
        f"\n1M pristine photos × {variants} variants = {samples / 1e6:.0f} M samples "
        f"({samples * CROPS_PER_SAMPLE / 1e6:.0f} M crops):"
    )
    print(
        f"  shard storage        {samples * size / 1e12:.1f} TB ({samples * size / 2**40:.1f} TiB) "
        f"at {size / 1024:.0f} KiB/sample"
    )
    print(f"  generation           {samples * cpu_s / 3600:,.0f} core-hours at {cpu_s * 1000:.0f} CPU ms/sample")
    hours = samples * CROPS_PER_SAMPLE / H100_CROPS_PER_S / 3600
    print(
        f"  one epoch on one H100 {hours:.1f} GPU-hours at {H100_CROPS_PER_S:,} crops/s (RN50, compile, batch 32; "
        "measured in an earlier session, docs/training.md)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--variants", type=int, default=4, help="samples per photo in the measured runs")
    p.add_argument("--workers", type=int, default=2, help="worker processes of the pool, the clusters and the loader")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions of the dask and loader runs")
    p.add_argument(
        "--only",
        choices=["degrade", "dask", "loader"],
        help="run one part (loader and the extrapolation need the degrade part's shards, so they run it too)",
    )
    args = p.parse_args()
    print(f"start: {load()}")
    cfg = DegradeConfig(variants=args.variants, samples_per_shard=8, workers=args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_ingest(
            IngestConfig(sources=(str(args.images),), val_fraction=0.0, workers=1), root / "ingest", progress=False
        )
        if args.only != "dask":
            cpu, size, shards = bench_degrade(root / "ingest", root, dataclasses.replace(cfg, workers=1))
        if args.only in (None, "dask"):
            bench_dask(root / "ingest", root, cfg, args.reps)
        if args.only in (None, "loader"):
            bench_loader(shards, args.reps, args.workers)
        if args.only != "dask":
            extrapolate(cpu, size, DegradeConfig().variants)


if __name__ == "__main__":
    main()
