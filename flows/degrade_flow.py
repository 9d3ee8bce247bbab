"""The degrade stage as a Prefect flow with one task per shard.

    plan (library: plan_degrade) -> write-shard.map(pending shards) -> finalize (index.json)

The tasks only call `qualiclip.degrade`; their arguments are small frozen dataclasses that
pickle, so any task runner can run the shard tasks: the default thread pool, Prefect's
``ProcessPoolTaskRunner``, or a Dask / Ray cluster — with no code change:

    from prefect_dask import DaskTaskRunner
    degrade_shards_flow.with_options(task_runner=DaskTaskRunner(address="tcp://scheduler:8786"))("params.yaml")

Each worker must see ``ingest`` and ``out`` at the same paths (a shared file system). The
output is byte-identical whichever runner, how many workers, and in which order shards finish
(docs/shards.md).
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, task, unmapped
from prefect.cache_policies import NONE

from qualiclip.config import build_config, load_params
from qualiclip.degrade import (
    DegradeConfig,
    DegradePlan,
    DegradeResult,
    ShardJob,
    degrade_lock,
    finalize_degrade,
    plan_degrade,
    write_one_shard,
)
from qualiclip.pipeline.paths import stage_paths

# cache_policy=NONE: the library resumes from the shards on disk; hashing a plan of millions of
# jobs for Prefect's cache would cost time and buy nothing.


@task(name="degrade-plan", cache_policy=NONE)
def plan_task(cfg: DegradeConfig, ingest: str, out: str) -> DegradePlan:
    return plan_degrade(cfg, Path(ingest), Path(out))


# retries: on a cluster a worker can vanish mid-shard; a shard write is atomic, so a retry is safe
@task(name="degrade-shard", cache_policy=NONE, retries=1)
def shard_task(job: ShardJob, cfg: DegradeConfig, images_dir: str, out_dir: str) -> dict:
    return write_one_shard(job, cfg, images_dir, out_dir)


@task(name="degrade-finalize", cache_policy=NONE)
def finalize_task(plan: DegradePlan, entries: list[dict]) -> DegradeResult:
    return finalize_degrade(plan, entries)


@flow(name="qualiclip-degrade-shards", log_prints=True)
def degrade_shards_flow(params_file: str = "params.yaml", ingest: str | None = None, out: str | None = None) -> dict:
    """Write the shards of params.yaml's ``degrade:`` section, one Prefect task per missing shard.

    ``ingest`` and ``out`` default to the degrade stage's paths in dvc.yaml.
    """
    cfg = build_config(DegradeConfig, load_params(params_file).get("degrade"), where="degrade")
    paths = stage_paths()
    ingest, out = ingest or paths.ingest, out or paths.shards
    with degrade_lock(Path(out)):  # one run per output folder, held here while the tasks run anywhere
        plan = plan_task(cfg, ingest, out)
        entries = shard_task.map(plan.pending, unmapped(cfg), unmapped(plan.images_dir), unmapped(plan.out_dir))
        result = finalize_task(plan, entries)
    print(f"degrade: {result.samples} samples in {result.shards} shards ({result.resumed_shards} resumed)")
    return {"samples": result.samples, "shards": result.shards, "bytes": result.bytes,
            "resumed_shards": result.resumed_shards}


if __name__ == "__main__":
    degrade_shards_flow()
