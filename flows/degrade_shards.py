"""The degrade stage as a Prefect flow with one task per shard.

    plan (library: plan_degrade) -> write-shard.map(pending shards) -> finalize (index.json)

The tasks only call `qualiclip.degrade`; their arguments are small frozen dataclasses that
pickle, so any task runner can run the shard tasks: the default thread pool, Prefect's
``ProcessPoolTaskRunner``, or a Dask / Ray cluster — with no code change. From the command line
(run from the repository root; docs/shards.md, "Dask"):

    python -m flows.degrade_shards --out s3://bucket/shards                          # thread pool
    python -m flows.degrade_shards --out s3://bucket/shards --dask local --workers 8  # a temporary LocalCluster
    python -m flows.degrade_shards --out s3://bucket/shards --dask tcp://scheduler:8786

Every worker must reach ``ingest`` at the same path (a shared file system), and ``out`` too: the
same path, or a bucket URL with the same credentials. The output is byte-identical whichever
runner, how many workers, and in which order shards finish (docs/shards.md).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, task, unmapped
from prefect.cache_policies import NONE
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

from qualiclip.degrade import (
    DegradeConfig,
    DegradePlan,
    DegradeResult,
    ShardJob,
    degrade_lock,
    finalize_degrade,
    limit_threads,
    plan_degrade,
    write_one_shard,
)
from qualiclip.pipeline.params import read_params
from qualiclip.pipeline.paths import stage_paths

# cache_policy=NONE: the library resumes from the shards on disk; hashing a plan of millions of
# jobs for Prefect's cache would cost time and buy nothing.


@task(name="degrade-plan", cache_policy=NONE)
def plan_task(cfg: DegradeConfig, ingest: str, out: str) -> DegradePlan:
    return plan_degrade(cfg, Path(ingest), out)  # out: a folder or an s3:// prefix


# retries: on a cluster a worker can vanish mid-shard; a shard write is atomic, so a retry is safe
@task(name="degrade-shard", cache_policy=NONE, retries=1)
def shard_task(job: ShardJob, cfg: DegradeConfig, images_dir: str, out_dir: str) -> dict:
    limit_threads()  # one task per worker thread: OpenCV's own threads would only oversubscribe
    return write_one_shard(job, cfg, images_dir, out_dir)


@task(name="degrade-finalize", cache_policy=NONE)
def finalize_task(plan: DegradePlan, entries: list[dict]) -> DegradeResult:
    return finalize_degrade(plan, entries)


@flow(name="qualiclip-degrade-shards", log_prints=True)
def degrade_shards_flow(params_file: str = "params.yaml", ingest: str | None = None, out: str | None = None) -> dict:
    """Write the shards of params.yaml's ``degrade:`` section, one Prefect task per missing shard.

    ``ingest`` and ``out`` default to the degrade stage's paths in dvc.yaml.
    """
    cfg = read_params(params_file, "degrade")["degrade"]  # the whole file checked before any task
    paths = stage_paths()
    ingest, out = ingest or paths.ingest, out or paths.shards
    with degrade_lock(out):  # one run per output folder (or bucket prefix), held here while the tasks run anywhere
        plan = plan_task(cfg, ingest, out)
        entries = shard_task.map(plan.pending, unmapped(cfg), unmapped(plan.images_dir), unmapped(plan.out_dir))
        result = finalize_task(plan, entries)
    print(f"degrade: {result.samples} samples in {result.shards} shards ({result.resumed_shards} resumed)")
    return {
        "samples": result.samples,
        "shards": result.shards,
        "bytes": result.bytes,
        "resumed_shards": result.resumed_shards,
    }


# ---------------------------------------------------------------------------------------------
# Dask: `python -m flows.degrade_shards --dask local|ADDRESS`


def local_cluster_kwargs(workers: int) -> dict:
    """A temporary `distributed.LocalCluster`: ``workers`` single-threaded processes (one shard job
    per core; threads would contend for the GIL), bound to 127.0.0.1. The scheduler still serves its
    health and metrics routes over HTTP: on a free loopback port, not on 8787 (which a second
    cluster on the machine would find taken). prefect-dask prints that port as the dashboard's; the
    dashboard page needs bokeh, which the project does not install."""
    return {
        "n_workers": workers,
        "processes": True,
        "threads_per_worker": 1,
        "host": "127.0.0.1",
        "dashboard_address": None,
        "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"},
    }


def dask_runner(address: str = "local", workers: int = 2):
    """The shard tasks on Dask (a `prefect_dask.DaskTaskRunner`): a running scheduler at ``address``
    (``tcp://host:8786``), or with ``"local"`` a temporary cluster of ``workers`` processes here."""
    from prefect_dask import DaskTaskRunner  # the `scale` extra: flows without Dask need no prefect-dask

    if address == "local":
        return DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(workers))
    return DaskTaskRunner(address=address)


class NoApiForWorkers(RuntimeError):
    """Dask workers elsewhere need a Prefect server they can reach; the message names the fix."""


@contextlib.contextmanager
def api_for_dask(address: str) -> Iterator[None]:
    """A Prefect API URL the Dask workers can reach: each shard task reports its run to it.

    Workers run with the flow's settings, not with its temporary server: without
    ``PREFECT_API_URL`` every worker would start a temporary server of its own (measured: ~15 s
    and a core each, and the task runs land in as many throw-away databases). With ``"local"``
    the temporary server is started here and its URL set for the run; the workers of a scheduler
    elsewhere need a server they can reach, named by ``PREFECT_API_URL``.
    """
    if PREFECT_API_URL.value():
        yield
        return
    if address != "local":
        raise NoApiForWorkers(
            f"--dask {address}: set PREFECT_API_URL to a Prefect server the Dask workers can reach "
            "(e.g. `prefect server start --host 0.0.0.0`, docs/shards.md), in their environment too"
        )
    # What a plain flow call starts on its own, with its URL exported (a Prefect-internal class).
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            try:
                yield
            finally:
                send_pending()
    finally:
        server.stop()


def send_pending() -> None:
    """Send what this process has logged and emitted to the Prefect API and not sent yet, and wait.

    Prefect sends logs and events in the background; what is left at exit goes then. A temporary
    server stopped before that leaves its last logs nowhere to go: the process waited ~70 s of
    retries after the run, then printed ``--- Error logging to API --- All connection attempts failed``.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):  # both stop, send what they hold and return; later use starts anew
        service.drain_all(timeout=60)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m flows.degrade_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--ingest", help="ingest output folder (default: dvc.yaml's degrade stage)")
    p.add_argument("--out", help="shard folder or s3://bucket/prefix (default: dvc.yaml's degrade stage)")
    p.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="run the shard tasks on Dask: 'local' (a temporary cluster "
        "on this machine) or a scheduler address such as tcp://scheduler:8786",
    )
    p.add_argument("--workers", type=int, default=2, help="worker processes of --dask local (default: 2)")
    args = p.parse_args(argv)
    if not args.dask:
        summary = degrade_shards_flow(args.params, args.ingest, args.out)
    else:
        try:
            with api_for_dask(args.dask):
                run = degrade_shards_flow.with_options(task_runner=dask_runner(args.dask, args.workers))
                summary = run(args.params, args.ingest, args.out)
        except NoApiForWorkers as exc:
            p.error(str(exc))
    print(summary)
    return summary


if __name__ == "__main__":
    main()
