"""Champion promotion: after an evaluation, move the registry alias only to a model that passes
the quality gate and beats the champion.

The model version that the train stage registered is found through ``registered_model.json``
beside the checkpoint (written by the train stage), or, failing that, through the version tags
``params_hash`` / ``data_version`` that match the checkpoint's ``metadata.json``. Every
promotion attempt tags that version with its params hash, data version (the shard index hash,
`qualiclip.shards.data_version`), DVC's md5 of the shard folder (``dvc_shards_md5``, where
``dvc.lock`` exists) and its headline evaluation metrics (``eval.<metric>``: every number of
metrics.json), so the registry alone can compare versions.

The alias moves only when the primary metric (``promotion.metric``), all three:

- beats the zero-shot baseline of the same evaluation (``baseline.<metric>`` in metrics.json;
  without it, i.e. ``evaluate.baseline: false``, nothing is promoted, and the reason says so);
- reaches the floor ``promotion.min_value`` (a ceiling when lower is better);
- beats the champion's by more than ``min_improvement`` (any model that passes the gate beats
  no champion: the first run passes the same gate as every other).

The decision and its reason are logged and tagged on the version (``promotion``,
``promotion.outcome``). The decision logic is plain Python; mlflow is imported only to open the
registry.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from ..checkpoint import read_metadata
from ..errors import QualiclipError
from .params import PromotionConfig, read_params
from .paths import stage_paths
from .tracking import VERSION_FILE

METRIC_TAG = "eval."  # version tag prefix of the evaluation metrics
BASELINE_KEY = "baseline"  # metrics.json block of the zero-shot baseline: baseline.<metric>
log = logging.getLogger(__name__)


class PromotionError(QualiclipError, RuntimeError):
    """Promotion cannot decide: a missing metric, no registered version, an unreadable file."""


@dataclass(frozen=True)
class Decision:
    model: str
    version: str
    promoted: bool
    outcome: str  # promoted | kept (champion better) | refused (gate) | unchanged (is the champion)
    metric: str
    value: float
    baseline_value: float | None  # the zero-shot baseline's value in the same evaluation
    min_value: float | None
    champion_version: str | None  # the champion before this decision
    champion_value: float | None
    reason: str
    champion_metrics: dict[str, float] = field(default_factory=dict)  # its eval.* tags, keys without the prefix
    run_id: str | None = None  # the MLflow run that logged the version (registered_model.json)
    experiment_id: str | None = None
    tracking_uri: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def metric_value(metrics: dict, dotted: str) -> float:
    """``metrics['synthetic']['srcc']`` for ``'synthetic.srcc'``; a clear error if absent."""
    node = metrics
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            have = ", ".join(sorted(flat_metrics(metrics))) or "none"
            raise PromotionError(
                f"metric '{dotted}' not in the evaluation metrics (have: {have}) "
                f"— set promotion.metric in params.yaml to one of them"
            )
        node = node[part]
    if not isinstance(node, (int, float)) or isinstance(node, bool) or math.isnan(node):
        raise PromotionError(f"metric '{dotted}' is {node!r}, not a number — cannot rank models on it")
    return float(node)


def flat_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves as ``{'synthetic.srcc': 0.8, ...}``."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flat_metrics(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def is_better(new: float, champion: float | None, cfg: PromotionConfig) -> bool:
    """Strictly better than the champion by more than ``min_improvement``; any value beats none."""
    if champion is None or math.isnan(champion):
        return True
    return _gain(new, champion, cfg) > cfg.min_improvement


def _gain(new: float, old: float, cfg: PromotionConfig) -> float:
    return new - old if cfg.higher_is_better else old - new


def gate_failures(value: float, baseline: float | None, cfg: PromotionConfig) -> list[str]:
    """Why a model with ``value`` may not become the champion, whatever the champion ([]: it may)."""
    failures = []
    if baseline is None:
        failures.append(
            f"the evaluation has no zero-shot baseline to beat ({BASELINE_KEY}.{cfg.metric}) — "
            "set evaluate.baseline: true in params.yaml and rerun the pipeline"
        )
    elif not _gain(value, baseline, cfg) > 0:
        failures.append(f"not better than the zero-shot baseline ({cfg.metric} {baseline:.4f})")
    if cfg.min_value is not None and _gain(value, cfg.min_value, cfg) < 0:
        bound = "floor" if cfg.higher_is_better else "ceiling"
        failures.append(f"beyond the {bound} promotion.min_value = {cfg.min_value}")
    return failures


def baseline_value(metrics: dict, metric: str) -> float | None:
    """``baseline.<metric>`` of the evaluation, None when the evaluate stage scored no baseline."""
    if not isinstance(metrics.get(BASELINE_KEY), dict):
        return None
    return metric_value(metrics, f"{BASELINE_KEY}.{metric}")


def dvc_shards_md5(project_dir: Path, shards: str) -> str | None:
    """The md5 that ``dvc.lock`` records for the shard folder (train's dep, else degrade's out).

    DVC's hash of the whole folder, recorded beside the data version, not as it: it exists only
    with ``dvc.lock`` and changes with files (plan.json) that are not training data.
    """
    lock = Path(project_dir) / "dvc.lock"
    if not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    entries = stages.get("train", {}).get("deps", []) + stages.get("degrade", {}).get("outs", [])
    for entry in entries:
        if Path(entry.get("path", "")) == Path(shards) and entry.get("md5"):
            return str(entry["md5"]).removesuffix(".dir")
    return None


def version_tags(meta: dict, shards_md5: str | None, metrics: dict) -> dict[str, str]:
    """The tags every evaluated version carries: provenance plus ``eval.<metric>`` values."""
    tags = {"params_hash": str(meta.get("params_hash", "")), "data_version": str(meta.get("data_version", ""))}
    if shards_md5:
        tags["dvc_shards_md5"] = shards_md5
    tags.update({f"{METRIC_TAG}{k}": repr(v) for k, v in flat_metrics(metrics).items()})
    return tags


def find_version(client, name: str, checkpoint: Path) -> str:
    """The registered version of ``checkpoint``: its version file (a version this registry must hold),
    else matching version tags."""
    vfile = Path(checkpoint).parent / VERSION_FILE
    if vfile.is_file():
        info = json.loads(vfile.read_text())
        if info.get("name") == name and info.get("version"):
            return _in_store(client, name, str(info["version"]))
    meta = read_metadata(Path(checkpoint))
    if not meta:
        raise PromotionError(f"no checkpoint metadata at {checkpoint} — run the train stage first")
    matches = [
        mv
        for mv in client.search_model_versions(f"name = '{name}'")
        if mv.tags.get("params_hash") == meta.get("params_hash")
        # shard_index_hash: where versions promoted by earlier code kept the data version
        and meta.get("data_version") in (mv.tags.get("data_version"), mv.tags.get("shard_index_hash"))
    ]
    if not matches:
        raise PromotionError(
            f"no version of registered model '{name}' matches {checkpoint} (params hash "
            f"{meta.get('params_hash')}) — was it trained with tracking.backend: none? "
            f"Rerun `dvc repro --force --single-item train && dvc repro` with MLflow tracking on"
        )
    return str(max(int(mv.version) for mv in matches))  # the newest of equal configs


def _in_store(client, name: str, version: str) -> str:
    """``version`` if the client's registry holds it; else the one-line fix (the train stage
    registered it in another store: another MLFLOW_TRACKING_URI, or the project's mlflow.db)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise PromotionError(
            f"this tracking store (MLFLOW_TRACKING_URI, else the project's mlflow.db) holds no version "
            f"{version} of '{name}', which the train stage registered — point MLFLOW_TRACKING_URI at "
            "the store it used, or log it in this one: `dvc repro --force --single-item train && "
            "dvc repro`"
        ) from None
    return version


def current_champion(client, name: str, cfg: PromotionConfig) -> tuple[str | None, dict[str, float]]:
    """(version, its ``eval.*`` tags as numbers, prefix dropped) of the alias holder; (None, {}) without one."""
    version = client.get_registered_model(name).aliases.get(cfg.alias)
    if version is None:
        return None, {}
    tags = client.get_model_version(name, str(version)).tags
    return str(version), {k.removeprefix(METRIC_TAG): _number(v) for k, v in tags.items() if k.startswith(METRIC_TAG)}


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def decide(
    client,
    name: str,
    version: str,
    value: float,
    baseline: float | None,
    cfg: PromotionConfig,
    *,
    dry_run: bool = False,
) -> Decision:
    """Move the alias to ``version`` only if it passes the gate and beats the champion; log and tag why."""
    champ, champ_metrics = current_champion(client, name, cfg)
    champ_value = champ_metrics.get(cfg.metric)
    key = f"{cfg.metric} {value:.4f}"
    failures = gate_failures(value, baseline, cfg)
    if champ == version:
        outcome, reason = "unchanged", f"version {version} is already the {cfg.alias} ({key})"
    elif failures:
        outcome, reason = "refused", f"refused version {version} ({key}): " + "; ".join(failures)
    elif is_better(value, champ_value, cfg):
        outcome = "promoted"
        reason = (
            f"no {cfg.alias} yet"
            if champ is None
            else f"{cfg.alias} version {champ} has no {METRIC_TAG}{cfg.metric} tag"
            if champ_value is None
            else f"better than {cfg.alias} version {champ} ({cfg.metric} {champ_value:.4f})"
        )
        reason = f"promoted version {version} ({key}, baseline {baseline:.4f}): {reason}"
    else:
        outcome = "kept"
        reason = (
            f"kept {cfg.alias} version {champ} ({cfg.metric} {champ_value:.4f}): version {version} "
            f"({key}) is not better by more than {cfg.min_improvement}"
        )
    log.log(logging.WARNING if outcome == "refused" else logging.INFO, "%s%s", "(dry run) " if dry_run else "", reason)
    if not dry_run:
        if outcome == "promoted":
            client.set_registered_model_alias(name, cfg.alias, version)
        client.set_model_version_tag(name, version, "promotion", reason)
        client.set_model_version_tag(name, version, "promotion.outcome", outcome)
    return Decision(
        name,
        version,
        outcome == "promoted",
        outcome,
        cfg.metric,
        value,
        baseline,
        cfg.min_value,
        champ,
        champ_value,
        reason,
        champ_metrics,
    )


def promote_project(
    project_dir: str | Path = ".",
    params_file: str = "params.yaml",
    *,
    checkpoint: str | None = None,
    metrics_file: str | None = None,
    shards: str | None = None,
    dry_run: bool = False,
) -> Decision:
    """Tag the version trained in ``project_dir`` with its evaluation and promote it if better.

    The paths default to those of the project's dvc.yaml (`qualiclip.pipeline.paths`).
    """
    project = Path(project_dir)
    params = read_params(project / params_file, "promotion", "tracking")
    cfg, tracking = params["promotion"], params["tracking"]
    if tracking.backend == "none":
        raise PromotionError("tracking.backend is 'none' in params.yaml: no model version was registered to promote")
    if None in (checkpoint, metrics_file, shards):  # the paths dvc.yaml names
        paths = stage_paths(project)
        checkpoint = checkpoint or paths.checkpoint
        metrics_file = metrics_file or paths.metrics
        shards = shards or paths.shards
    assert checkpoint and metrics_file and shards  # given, or read from dvc.yaml
    mfile = project / metrics_file
    if not mfile.is_file():
        raise PromotionError(f"no evaluation metrics at {mfile} — run the evaluate stage first (dvc repro)")
    metrics = json.loads(mfile.read_text())
    value = metric_value(metrics, cfg.metric)  # fail before touching the registry
    baseline = baseline_value(metrics, cfg.metric)

    from .tracking_mlflow import registry_client, tracking_uri  # mlflow: optional, and seconds to import

    client = registry_client(project)
    name = tracking.registered_model
    version = find_version(client, name, project / checkpoint)
    tags = version_tags(read_metadata(project / checkpoint), dvc_shards_md5(project, shards), metrics)
    if not dry_run:
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
    decision = decide(client, name, version, value, baseline, cfg, dry_run=dry_run)
    run_id = client.get_model_version(name, version).run_id or None
    experiment = client.get_run(run_id).info.experiment_id if run_id else None
    return replace(decision, run_id=run_id, experiment_id=experiment, tracking_uri=tracking_uri(project))
