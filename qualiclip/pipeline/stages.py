"""The pipeline stages as plain functions: params file + paths in, result out.

The CLI (what dvc.yaml calls) and the Prefect flows both call these, so a stage has one body.
Each opens its tracker run first, from the ``tracking:`` section alone (so that a stage failing
on its params or inputs is a failed run too), then reads params.yaml whole
(`params.read_params`: every section checked, the sections it reads required, before any
work), records the datasets it consumes
(`qualiclip.pipeline.lineage`), runs the library stage, and logs params, metrics and pictures.
Each stage imports the library modules it runs inside its own function, for two reasons: a
stage process then loads exactly the code that dvc.yaml lists as that stage's dependencies
(tests/test_pipeline_dvc.py compares the two), so a changed distortion reruns degrade but not
ingest; and ingest and degrade (and their spawned shard workers) do not pay seconds for torch
and open_clip.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..config import build_config, config_dict, load_params
from ..tracking import DatasetRef, Tracker
from .params import read_params
from .paths import check_sources_are_deps
from .tracking_config import TrackingConfig, get_tracker, read_version_file, write_version_file


def _tracker(params_file: str) -> tuple[Tracker, TrackingConfig]:
    """The stage's tracker, built from the ``tracking:`` section alone: an error in any other
    section is then logged as a failed run (the whole file is checked inside the run)."""
    t = build_config(TrackingConfig, load_params(params_file).get("tracking"), where="tracking")
    return get_tracker(t.backend, experiment=t.experiment), t


def stage_ingest(params_file: str, out: str) -> dict:
    from ..ingest import SKIMAGE_SOURCE, run_ingest  # see the module docstring

    tracker, _ = _tracker(params_file)
    with tracker.run("ingest"):
        cfg = read_params(params_file, "ingest", "tracking")["ingest"]
        if os.environ.get("DVC_STAGE"):  # under dvc repro, which sets it: DVC must see the photos change
            check_sources_are_deps([s for s in cfg.sources if s != SKIMAGE_SOURCE], _dvc_stage_name())
        tracker.log_params({"ingest": config_dict(cfg)})
        result = run_ingest(cfg, Path(out))
        summary = json.loads((Path(out) / "summary.json").read_text())
        # the rejection counters that are not zero (n_rejected is their sum): 12 zeros say nothing
        rejected = {reason: n for reason, n in summary["rejected"].items() if n}
        tracker.log_metrics({"ingest": {**_numbers(summary), "rejected": rejected}})
        tracker.log_artifact(Path(out) / "rejected.csv")
    print(
        f"ingest: {result.n_accepted} images ({result.n_train} train, {result.n_val} val), "
        f"{result.n_rejected} rejected (see {result.rejected})"
    )
    return summary


def _dvc_stage_name() -> str:
    """The running stage's name in dvc.yaml (DVC_STAGE is ``name`` or ``path/dvc.yaml:name``)."""
    return os.environ["DVC_STAGE"].rsplit(":", 1)[-1]


def stage_degrade(params_file: str, ingest: str, out: str) -> dict:
    from ..degrade import run_degrade  # see the module docstring
    from .lineage import manifest_input

    tracker, _ = _tracker(params_file)
    with tracker.run("degrade"):
        cfg = read_params(params_file, "degrade", "tracking")["degrade"]
        tracker.log_input(manifest_input(Path(ingest), cfg.split), "training")
        tracker.log_params({"degrade": config_dict(cfg)})
        result = run_degrade(cfg, Path(ingest), out)  # out: a folder or an s3:// prefix
        tracker.log_metrics(
            {
                "degrade.shards": result.shards,
                "degrade.samples": result.samples,
                "degrade.bytes_per_sample": result.bytes / max(1, result.samples),
            }
        )
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


def stage_train(params_file: str, shards: str | None, out: str, ingest: str | None = None) -> dict:
    """Train on ``shards``, or with ``train.source: on_the_fly`` on the samples the degrade section
    plans for ``ingest``, rendered in the loader (docs/training.md, "Samples on the fly")."""
    from ..datasets import check_datasets  # see the module docstring
    from ..figures import plot_loss_curves
    from ..identity import params_hash
    from ..train import run_train

    tracker, tcfg = _tracker(params_file)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 tracks and registers
    if not main_process:
        tracker = Tracker()
    logged = None
    with tracker.run("train"):
        params = read_params(params_file, "train", "model", "evaluate", "tracking")
        cfg, model_cfg = params["train"], params["model"]
        data, source = _train_data(params_file, cfg.source, shards, ingest)
        # evaluate runs after training: a broken evaluate.datasets entry must fail now, not hours later
        check_datasets(params["evaluate"])
        phash = params_hash(model_cfg, cfg)
        provenance = {"params_hash": phash, "data_version": data.digest}
        tracker.set_tags({f"qualiclip.{k}": v for k, v in provenance.items()})
        tracker.log_input(data, "training")
        tracker.log_params({"model": config_dict(model_cfg), "train": config_dict(cfg)})
        meta = {**provenance, "model": config_dict(model_cfg), "train": config_dict(cfg)}
        result = run_train(cfg, model_cfg, source, Path(out), tracker=tracker, metadata=meta)
        tracker.log_figure(plot_loss_curves(Path(out) / "train_log.csv", Path(out) / "loss_curves.png"))
        if tracker.enabled:
            logged = tracker.log_model(
                result.checkpoint,
                register_as=tcfg.registered_model,
                description=f"params hash {phash}; data version {data.digest}; {result.steps} steps",
                tags={**provenance, "execution_id": getattr(tracker, "execution_id", "")},
            )
            print(f"train: registered {tcfg.registered_model} version {logged and logged.version}")
    if main_process:  # one line per run, not one per rank
        write_version_file(
            Path(out),
            tcfg.registered_model,
            logged.version if logged else None,
            getattr(tracker, "run_id", None),
            logged.model_id if logged else None,
        )
        print(
            f"train: {result.steps} step{'' if result.steps == 1 else 's'} in {result.seconds:.0f}s, "
            f"{_final_losses(result.final)}"
        )
    return {
        "checkpoint": str(result.checkpoint),
        "final": result.final,
        "model_version": logged and logged.version,
        "params_hash": phash,
    }


def _train_data(params_file: str, source: str, shards: str | None, ingest: str | None):
    """(the dataset reference train logs, what `run_train` reads): a shard folder or prefix, or
    for ``train.source: on_the_fly`` the degrade plan of ``ingest`` (the ``degrade`` section)."""
    from ..train import TrainError

    if source == "shards":
        from .lineage import shard_input

        if not shards:
            raise TrainError("train.source is shards: pass --shards (the degrade stage's output folder)")
        return shard_input(shards), shards  # fails with the fix ("run the degrade stage first")
    from ..onthefly import plan_samples
    from .lineage import plan_input

    if not ingest:
        raise TrainError("train.source is on_the_fly: pass --ingest (the ingest stage's output folder)")
    plan = plan_samples(Path(ingest), read_params(params_file, "degrade")["degrade"])
    return plan_input(Path(ingest), plan), plan


def _final_losses(final: dict[str, float]) -> str:
    """``final loss 0.4123 (cons 0.0812, pos 0.1650, neg 0.1661)``: the last step's terms, rounded."""
    if "loss" not in final:
        return "no step run"
    terms = ", ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in final.items() if k != "loss")
    return f"final loss {final['loss']:.4f}" + (f" ({terms})" if terms else "")


def stage_evaluate(params_file: str, model: str, ingest: str, out: str) -> dict:
    from ..checkpoint import load_checkpoint, read_metadata  # see the module docstring
    from ..datasets import check_datasets
    from ..evaluate import run_evaluate
    from .lineage import iqa_input, manifest_input

    tracker, _ = _tracker(params_file)
    with tracker.run("evaluate"):
        cfg = read_params(params_file, "evaluate", "tracking")["evaluate"]
        checkpoint = load_checkpoint(model)
        tracker.log_params({"evaluate": config_dict(cfg), "model": config_dict(checkpoint.cfg)})
        meta = read_metadata(Path(model)) if Path(model).is_dir() else {}
        tracker.set_tags({f"qualiclip.{k}": str(meta[k]) for k in ("params_hash", "data_version") if k in meta})
        model_id = read_version_file(Path(model)).get("model_id")
        model_id = model_id if model_id and tracker.link_model(model_id) else None
        datasets = check_datasets(cfg)
        inputs = {"synthetic": manifest_input(Path(ingest), cfg.split)}
        inputs |= {label: iqa_input(label, ds) for label, ds in datasets}
        for ref in inputs.values():
            tracker.log_input(ref, "evaluation")
        result = run_evaluate(cfg, checkpoint, Path(ingest), Path(out), datasets)
        log_evaluation(tracker, result.metrics, inputs, model_id)
        tracker.log_table(result.per_distortion, "per_distortion.json")
        for png in sorted((Path(out) / "plots").glob("*.png")):
            tracker.log_figure(png)
    syn = result.metrics["synthetic"]
    print(
        f"evaluate: synthetic SRCC {syn['srcc']:.3f} PLCC {syn['plcc']:.3f} KRCC {syn['krcc']:.3f} "
        f"(within image×type {syn['srcc_within']:.3f})"
    )
    return result.metrics


def log_evaluation(tracker: Tracker, metrics: dict, inputs: dict[str, DatasetRef], model_id: str | None) -> None:
    """The headline metrics, each block against the dataset it was measured on.

    The trained model's blocks are also logged against the model (``model_id``: they show on its
    page in MLflow); the baseline's blocks (``baseline.*``) belong to the run only.
    """

    def dataset(block: str) -> DatasetRef:  # "synthetic", "n_synthetic", "<label>", "<label>_test"
        if block in ("synthetic", "n_synthetic"):
            return inputs["synthetic"]
        return inputs.get(block) or inputs[block.removesuffix("_test")]

    for block, values in metrics.items():
        if block == "baseline":
            for name, base in values.items():
                tracker.log_metrics({"baseline": {name: base}}, dataset=dataset(name))
        else:
            tracker.log_metrics({block: values}, model_id=model_id, dataset=dataset(block))


def _numbers(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, dict)) and not isinstance(v, bool)}


PLUS_STATUS = "status.json"  # the plus stage's record of what it did (also with no dataset named)
PLUS_SUFFIX = "-plus"  # the QualiCLIP+ model is registered as `<tracking.registered_model>-plus`


def stage_plus(params_file: str, model: str, out: str, eval_out: str) -> dict:
    """QualiCLIP+ (docs/plus.md): prompt learning on ``plus.dataset`` from the checkpoint ``model``,
    the result in ``out``, its evaluation (metrics.json, the plus stage's DVC metrics) in ``eval_out``.

    Opt-in: with no dataset named it writes `PLUS_STATUS` saying so and an empty metrics file, and
    returns, loading neither torch nor a tracker, so the default pipeline keeps its run time (a
    fraction of a second).
    """
    params = read_params(params_file, "plus", "evaluate", "tracking")
    cfg = params["plus"]
    Path(out).mkdir(parents=True, exist_ok=True)
    if cfg.dataset is None:
        status = {"ran": False, "reason": "no labelled dataset named (plus.dataset)"}
        (Path(out) / PLUS_STATUS).write_text(json.dumps(status, indent=2) + "\n")
        _empty_evaluation(Path(eval_out))
        print("plus: skipped — no labelled dataset named (set plus.dataset to learn from opinion scores)")
        return status
    return _run_plus(params_file, params, model, out, eval_out)


def _empty_evaluation(folder: Path) -> None:
    """The evaluation folder of a skipped stage: ``metrics.json`` holding ``{}`` and nothing else."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("scores_*.csv"), *folder.glob("plots/*.png")]:
        stale.unlink()
    (folder / "metrics.json").write_text("{}\n")


def plus_eval_sets(params: dict, ds) -> list:
    """What a QualiCLIP+ model is evaluated on, as ``(label, dataset)``: its test split (block
    `qualiclip.plus.TEST_LABEL`, where it holds 3 images or more) and every ``evaluate.datasets``
    entry (cross-dataset), checked. The stage and the re-scoring of its champion both use this."""
    from ..datasets import check_datasets
    from ..plus import TEST_LABEL, PlusError, make_splits, split_dataset

    datasets = check_datasets(params["evaluate"])
    if any(label == TEST_LABEL for label, _ in datasets):
        raise PlusError(
            f"an evaluate.datasets entry is labelled '{TEST_LABEL}', the plus stage's name for its test split "
            "— give that entry another `label:`"
        )
    test = make_splits(ds, params["plus"].seed)["test"]
    return ([(TEST_LABEL, split_dataset(ds, test))] if len(test) >= 3 else []) + datasets


def evaluate_plus(params: dict, sets: list, model, out: Path, start=None):
    """`qualiclip.evaluate.run_evaluate_datasets` of ``model`` on ``sets`` (`plus_eval_sets`),
    with ``start`` (the QualiCLIP model it starts from) as the baseline on the same images."""
    from ..evaluate import run_evaluate_datasets

    return run_evaluate_datasets(params["evaluate"], model, sets, out, baseline=start)


def _run_plus(params_file: str, params: dict, model: str, out: str, eval_out: str) -> dict:
    from ..checkpoint import load_checkpoint, read_metadata  # see the module docstring
    from ..plus import load_labelled, save_plus, train_plus
    from .lineage import iqa_input

    tracker, tcfg = _tracker(params_file)
    cfg = params["plus"]
    name = tcfg.registered_model + PLUS_SUFFIX
    logged = None
    with tracker.run("plus"):
        if os.environ.get("DVC_STAGE") and "root" in cfg.dataset:  # under dvc repro: DVC must see the labels change
            root = str(cfg.dataset["root"])
            check_sources_are_deps([root], _dvc_stage_name(), key="plus.dataset.root", news="changed labels")
        ds = load_labelled(cfg.dataset)
        sets = plus_eval_sets(params, ds)  # a broken evaluate.datasets entry fails now, not after training
        base = load_checkpoint(model)
        tracker.log_input(iqa_input("plus", ds), "training")
        inputs = {label: iqa_input(label, d) for label, d in sets}
        for ref in inputs.values():
            tracker.log_input(ref, "evaluation")
        tracker.log_params({"plus": config_dict(cfg)})
        base_meta = read_metadata(Path(model)) if Path(model).is_dir() else {}
        meta = {"plus": config_dict(cfg), "base": {k: base_meta.get(k) for k in ("params_hash", "data_version")}}
        result = train_plus(
            base, ds, cfg, on_epoch=lambda row: tracker.log_metrics({"plus_train": row}, step=row["epoch"])
        )
        checkpoint = save_plus(result, ds, Path(out), meta)
        metrics = evaluate_plus(params, sets, result.model, Path(eval_out), start=base).metrics
        tracker.log_artifact(Path(out) / "splits.json")
        if tracker.enabled:
            logged = tracker.log_model(
                checkpoint,
                register_as=name,
                description=f"QualiCLIP+ on {ds.name} ({len(result.splits['train'])} train images)",
                tags={"variant": "qualiclip+", "execution_id": getattr(tracker, "execution_id", "")},
            )
        log_evaluation(tracker, metrics, inputs, logged.model_id if logged else None)
        for png in sorted((Path(eval_out) / "plots").glob("*.png")):
            tracker.log_figure(png)
    write_version_file(
        Path(out),
        name,
        logged.version if logged else None,
        getattr(tracker, "run_id", None),
        logged.model_id if logged else None,
    )
    print(f"plus: {len(result.log)} epochs on {len(result.splits['train'])} images, {plus_summary(metrics)}")
    status = {"ran": True, "dataset": ds.name, "best_epoch": result.best_epoch, "metrics": metrics}
    (Path(out) / PLUS_STATUS).write_text(json.dumps(status, indent=2) + "\n")
    return status


def plus_summary(metrics: dict) -> str:
    """``test SRCC 0.512 PLCC 0.498 (from 0.101, 0.087); koniq SRCC …``: each block's figures,
    rounded, and those of the model it starts from on the same images."""
    parts = []
    for label in sorted((k for k in metrics if k != "baseline"), key=lambda k: k != "test"):  # test first
        m = metrics[label]
        start = metrics.get("baseline", {}).get(label)
        was = f" (from {start['srcc']:.3f}, {start['plcc']:.3f})" if start else ""
        parts.append(f"{label} SRCC {m['srcc']:.3f} PLCC {m['plcc']:.3f}{was}")
    return "; ".join(parts) or "no test split of 3+ images and no evaluate.datasets"
