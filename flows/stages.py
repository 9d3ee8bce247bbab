"""Each pipeline stage as a Prefect flow: the same stage function the CLI and DVC run."""
from __future__ import annotations

from prefect import flow

from qualiclip import stages


@flow(name="qualiclip-ingest", log_prints=True)
def ingest_flow(params_file: str = "params.yaml", out: str = "data/ingest") -> dict:
    return stages.stage_ingest(params_file, out)


@flow(name="qualiclip-degrade", log_prints=True)
def degrade_flow(params_file: str = "params.yaml", ingest: str = "data/ingest", out: str = "data/shards") -> dict:
    return stages.stage_degrade(params_file, ingest, out)


@flow(name="qualiclip-train", log_prints=True)
def train_flow(params_file: str = "params.yaml", shards: str = "data/shards", out: str = "outputs/train") -> dict:
    return stages.stage_train(params_file, shards, out)


@flow(name="qualiclip-evaluate", log_prints=True)
def evaluate_flow(
    params_file: str = "params.yaml",
    model: str = "outputs/train/checkpoint",
    ingest: str = "data/ingest",
    out: str = "outputs/eval",
) -> dict:
    return stages.stage_evaluate(params_file, model, ingest, out)
