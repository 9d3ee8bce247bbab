"""The pipeline stages as plain functions: params file + paths in, result out.

The CLI (what dvc.yaml calls) and the Prefect flows both call these, so a stage has one body.
Each builds its typed configs from params.yaml, runs the library stage inside a tracker run,
and logs params, metrics and pictures. Each stage imports the library modules it runs inside
its own function, for two reasons: a stage process then loads exactly the code that dvc.yaml
lists as that stage's dependencies (tests/test_pipeline_dvc.py compares the two), so a changed
distortion reruns degrade but not ingest; and ingest and degrade (and their spawned shard
workers) do not pay seconds for torch and open_clip.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from ..config import build_config, config_dict, load_params, params_hash
from ..tracking import Tracker
from .paths import check_sources_are_deps
from .tracking import TrackingConfig, get_tracker, write_version_file


def _tracker(params: dict, params_file: str) -> tuple[Tracker, TrackingConfig]:
    t = build_config(TrackingConfig, params.get("tracking"), where="tracking")
    return get_tracker(t.backend, experiment=t.experiment, params_file=Path(params_file)), t


def stage_ingest(params_file: str, out: str) -> dict:
    from ..ingest import SKIMAGE_SOURCE, IngestConfig, run_ingest  # see the module docstring

    params = load_params(params_file)
    cfg = build_config(IngestConfig, params.get("ingest"), where="ingest")
    if os.environ.get("DVC_STAGE"):  # under dvc repro, which sets it: DVC must see the photos change
        check_sources_are_deps([s for s in cfg.sources if s != SKIMAGE_SOURCE], _dvc_stage_name())
    tracker, _ = _tracker(params, params_file)
    with tracker.run("ingest"):
        tracker.log_params({"ingest": config_dict(cfg)})
        result = run_ingest(cfg, Path(out))
        summary = json.loads((Path(out) / "summary.json").read_text())
        tracker.log_metrics({"ingest": _numbers(summary)})
        tracker.log_artifact(Path(out) / "rejected.csv")
    print(f"ingest: {result.n_accepted} images ({result.n_train} train, {result.n_val} val), "
          f"{result.n_rejected} rejected (see {result.rejected})")
    return summary


def _dvc_stage_name() -> str:
    """The running stage's name in dvc.yaml (DVC_STAGE is ``name`` or ``path/dvc.yaml:name``)."""
    return os.environ["DVC_STAGE"].rsplit(":", 1)[-1]


def stage_degrade(params_file: str, ingest: str, out: str) -> dict:
    from ..degrade import DegradeConfig, run_degrade  # see the module docstring

    params = load_params(params_file)
    cfg = build_config(DegradeConfig, params.get("degrade"), where="degrade")
    tracker, _ = _tracker(params, params_file)
    with tracker.run("degrade"):
        tracker.log_params({"degrade": config_dict(cfg)})
        result = run_degrade(cfg, Path(ingest), Path(out))
        tracker.log_metrics({"degrade.shards": result.shards, "degrade.samples": result.samples,
                             "degrade.bytes_per_sample": result.bytes / max(1, result.samples)})
        if tracker.enabled:
            tracker.log_figure(_contact_sheet_for(Path(ingest)))
    print(f"degrade: {result.samples} samples in {result.shards} shards ({result.resumed_shards} resumed)")
    return {"samples": result.samples, "shards": result.shards, "bytes": result.bytes}


def _contact_sheet_for(ingest_dir: Path) -> Path:
    """A contact sheet of every type × level on the first training image, for the MLflow run."""
    from ..distortions import save_contact_sheet
    from ..ingest import images_dir, load_image, read_manifest

    first = read_manifest(ingest_dir, "train")[0]["id"]
    out = Path(tempfile.mkdtemp()) / "distortions_contact_sheet.png"
    save_contact_sheet(load_image(images_dir(ingest_dir), first), out)
    return out


def stage_train(params_file: str, shards: str, out: str) -> dict:
    from ..evaluate import EvaluateConfig, check_datasets  # see the module docstring
    from ..model import ModelConfig
    from ..plots import plot_loss_curves
    from ..shards import INDEX_FILE, read_index
    from ..train import TrainConfig, run_train

    params = load_params(params_file)
    cfg = build_config(TrainConfig, params.get("train"), where="train")
    model_cfg = build_config(ModelConfig, params.get("model"), where="model")
    read_index(Path(shards))  # fails with the fix ("run the degrade stage first") before any work
    # evaluate runs after training: a broken evaluate.datasets entry must fail now, not hours later
    check_datasets(build_config(EvaluateConfig, params.get("evaluate"), where="evaluate"))
    tracker, tcfg = _tracker(params, params_file)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 tracks and registers
    if not main_process:
        tracker = Tracker()
    phash = params_hash(model_cfg, cfg)
    data_version = hashlib.sha256((Path(shards) / INDEX_FILE).read_bytes()).hexdigest()[:12]
    meta = {"params_hash": phash, "data_version": data_version, "model": config_dict(model_cfg), "train": config_dict(cfg)}
    version = None
    with tracker.run("train", tags={"qualiclip.params_hash": phash, "qualiclip.data_version": data_version}):
        tracker.log_params({"model": config_dict(model_cfg), "train": config_dict(cfg)})
        result = run_train(cfg, model_cfg, Path(shards), Path(out), tracker=tracker, metadata=meta)
        tracker.log_figure(plot_loss_curves(Path(out) / "train_log.csv", Path(out) / "loss_curves.png"))
        if tracker.enabled:
            version = tracker.log_model(
                result.checkpoint, register_as=tcfg.registered_model,
                description=f"params hash {phash}; data version {data_version}; {result.steps} steps",
                tags={"params_hash": phash, "data_version": data_version, "pipeline_id": getattr(tracker, "pipeline", "")},
            )
            print(f"train: registered {tcfg.registered_model} version {version}")
    if main_process:
        write_version_file(Path(out), tcfg.registered_model, version, getattr(tracker, "run_id", None))
    print(f"train: {result.steps} steps in {result.seconds:.0f}s, final {result.final}")
    return {"checkpoint": str(result.checkpoint), "final": result.final, "model_version": version, "params_hash": phash}


def stage_evaluate(params_file: str, model: str, ingest: str, out: str) -> dict:
    from ..checkpoint import load_checkpoint  # see the module docstring
    from ..evaluate import EvaluateConfig, run_evaluate

    params = load_params(params_file)
    cfg = build_config(EvaluateConfig, params.get("evaluate"), where="evaluate")
    tracker, _ = _tracker(params, params_file)
    with tracker.run("evaluate"):
        tracker.log_params({"evaluate": config_dict(cfg)})
        metrics = run_evaluate(cfg, load_checkpoint(model), Path(ingest), Path(out))
        tracker.log_metrics(metrics)
        for png in sorted((Path(out) / "plots").glob("*.png")):
            tracker.log_figure(png)
    syn = metrics["synthetic"]
    print(f"evaluate: synthetic SRCC {syn['srcc']:.3f} PLCC {syn['plcc']:.3f} KRCC {syn['krcc']:.3f} "
          f"(within image×type {syn['srcc_within']:.3f})")
    return metrics


def _numbers(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, dict)) and not isinstance(v, bool)}
