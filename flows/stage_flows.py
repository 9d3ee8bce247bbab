"""Each DVC stage as a Prefect flow of its own (``qualiclip-<stage>``): the same stage function
(`qualiclip.pipeline.stages`) the CLI and DVC run. The degrade stage with a task per shard is
another flow, `flows.degrade_shards`.

A path left out is the one dvc.yaml (in the working directory) gives that stage.
"""

from __future__ import annotations

from prefect import flow

from qualiclip.pipeline import stages
from qualiclip.pipeline.paths import stage_paths


@flow(name="qualiclip-ingest", log_prints=True)
def ingest_flow(params_file: str = "params.yaml", out: str | None = None) -> dict:
    return stages.stage_ingest(params_file, out or stage_paths().ingest)


@flow(name="qualiclip-degrade", log_prints=True)
def degrade_flow(params_file: str = "params.yaml", ingest: str | None = None, out: str | None = None) -> dict:
    paths = stage_paths()
    return stages.stage_degrade(params_file, ingest or paths.ingest, out or paths.shards)


@flow(name="qualiclip-train", log_prints=True)
def train_flow(params_file: str = "params.yaml", shards: str | None = None, out: str | None = None) -> dict:
    paths = stage_paths()
    return stages.stage_train(params_file, shards or paths.shards, out or paths.train)


@flow(name="qualiclip-evaluate", log_prints=True)
def evaluate_flow(
    params_file: str = "params.yaml", model: str | None = None, ingest: str | None = None, out: str | None = None
) -> dict:
    paths = stage_paths()
    return stages.stage_evaluate(params_file, model or paths.checkpoint, ingest or paths.ingest, out or paths.evaluate)
