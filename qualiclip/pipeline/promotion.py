"""Champion promotion: after an evaluation, move the registry alias only to a model that is,
with the configured confidence, better than the champion and the zero-shot baseline on the same
images.

The model version that the train stage registered is found through ``registered_model.json``
beside the checkpoint (written by the train stage), or, failing that, through the version tags
``params_hash`` / ``data_version`` that match the checkpoint's ``metadata.json``. Every
promotion attempt tags that version with its params hash, data version (the shard index hash,
`qualiclip.shards.data_version`), DVC's md5 of the shard folder (``dvc_shards_md5``, where
``dvc.lock`` exists) and its headline evaluation metrics (``eval.<metric>``: every number of
metrics.json) — a record, never a comparison.

Same images, same way: the champion is re-scored here, by `qualiclip.evaluate.run_evaluate`, on
the evaluation data of this run (the held-out synthetic set and every ``evaluate.datasets``
entry), never read from its own old tags. Its scores are cached in
``outputs/promotion/<model>-v<version>-<digest>/`` (``digest``: the evaluation data, see
`evaluation_digest`), so a rerun does not score it again, and no DVC stage output depends on the
registry. A champion that cannot be loaded or scored is a refusal that says why.

The alias moves only when, on the promotion metric (``promotion.metric``) and a paired bootstrap
over photos (`qualiclip.pipeline.bootstrap`, ``promotion.bootstrap`` resamples, seeded by
``promotion.seed``), all three hold:

- the lower bound at ``promotion.confidence`` of (this model − the zero-shot baseline) is above 0
  (the baseline's per-image scores: ``evaluate.baseline: true``; without them nothing is
  promoted, and the reason says so);
- the model's figure is not below the floor ``promotion.min_value`` (a ceiling when lower is better);
- the lower bound of (this model − the champion) is above ``min_improvement`` (no champion yet:
  the first two alone decide).

``promote_project(..., plus=True)`` (``qualiclip promote --plus``) applies the same gate to the
QualiCLIP+ model of the plus stage (`plus_target`): its own registered model and champion, its
metric ``promotion.plus_metric``, the QualiCLIP model it starts from as the baseline to beat,
and its champion re-scored by the plus stage's evaluation (`plus_evaluator`).

The decision (both figures on the same n, the difference, its interval, the confidence) is
logged, written first in the version's description, and tagged on the version (``promotion``,
``promotion.outcome``). mlflow is imported only to open the registry.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import read_metadata
from ..errors import QualiclipError
from ..identity import dvc_shards_md5, evaluation_digest
from ..schema import EvaluateConfig
from .bootstrap import METRICS, Items, lower_bound, paired_differences, point, unit_index, upper_bound
from .params import PromotionConfig, read_params
from .paths import stage_paths
from .tracking_config import VERSION_FILE

METRIC_TAG = "eval."  # version tag prefix of the evaluation metrics
BASELINE_KEY = "baseline"  # metrics.json block of the zero-shot baseline: baseline.<metric>
CACHE_DIR = "outputs/promotion"  # the champion's re-scored evaluations, one folder per version and data
FIGURES_SEP = " — on the same "  # between the reason and its figures in the `promotion` tag
ZERO_SHOT = "zero-shot baseline"  # what the QualiCLIP model must beat: its backbone before fine-tuning
STARTING_MODEL = "model it starts from"  # what a QualiCLIP+ model must beat: the QualiCLIP model it learnt on
NOT_PROMOTED = ("refused", "kept")  # outcomes that leave the alias where it was (exit 3 of `qualiclip promote`)
log = logging.getLogger(__name__)


class PromotionError(QualiclipError, RuntimeError):
    """Promotion cannot decide: a missing metric, no registered version, an unreadable file."""


@dataclass(frozen=True)
class Comparison:
    """This model against another, both scored on the same items: the other's figure, the point
    difference (this − other) and the bootstrap interval of the difference at the confidence."""

    against: str  # "champion v3" | "zero-shot baseline"
    value: float  # the other model's figure on the same items
    difference: float
    low: float  # the (1 - confidence) quantile: the one-sided lower bound at the confidence
    high: float  # the confidence quantile


@dataclass(frozen=True)
class Decision:
    model: str
    version: str
    promoted: bool
    outcome: str  # promoted | kept (not surely better than the champion) | refused (gate) | unchanged (is the champion)
    metric: str
    value: float
    baseline_value: float | None  # the zero-shot baseline's value on the same items
    min_value: float | None
    champion_version: str | None  # the champion before this decision
    champion_value: float | None  # the champion re-scored on the same items (None: no champion, or not scored)
    reason: str
    champion_metrics: dict[str, float] = field(default_factory=dict)  # the champion's re-scored metrics, flat
    run_id: str | None = None  # the MLflow run that logged the version (registered_model.json)
    experiment_id: str | None = None
    tracking_uri: str = ""
    n_items: int = 0  # the items both figures are computed on
    n_units: int = 0  # the independent units among them (photos; a dataset's images)
    confidence: float = 0.0
    resamples: int = 0
    versus_champion: Comparison | None = None
    versus_baseline: Comparison | None = None
    min_improvement: float = 0.0

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


def _gain(new: float, old: float, cfg: PromotionConfig) -> float:
    return new - old if cfg.higher_is_better else old - new


def version_tags(meta: dict, shards_md5: str | None, metrics: dict, *, provenance: bool = True) -> dict[str, str]:
    """The tags every evaluated version carries: provenance plus ``eval.<metric>`` values."""
    tags = {}
    if provenance:
        tags = {"params_hash": str(meta.get("params_hash", "")), "data_version": str(meta.get("data_version", ""))}
    if shards_md5:
        tags["dvc_shards_md5"] = shards_md5
    tags.update({f"{METRIC_TAG}{k}": repr(v) for k, v in flat_metrics(metrics).items()})
    return tags


def find_version(client, name: str, checkpoint: Path, *, by_tags: bool = True) -> str:
    """The registered version of ``checkpoint``: its version file (a version this registry must hold),
    else (``by_tags``) matching version tags."""
    vfile = Path(checkpoint).parent / VERSION_FILE
    if vfile.is_file():
        info = json.loads(vfile.read_text())
        if info.get("name") == name and info.get("version"):
            return _in_store(client, name, str(info["version"]))
    if not by_tags:
        raise PromotionError(
            f"no version of '{name}' recorded in {vfile} — run the stage that wrote {checkpoint} "
            "with MLflow tracking on (tracking.backend: mlflow)"
        )
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


# ---------------------------------------------------------------------------------------------
# The evaluation data: per-image scores the evaluate stage wrote


@dataclass(frozen=True)
class Scores:
    """One evaluation block's items and a model's per-image scores on them (and the baseline's)."""

    items: Items
    keys: list[tuple]  # what each item is (image_id, distortion, level) | (path, mos, split)
    scores: np.ndarray
    baseline: np.ndarray | None


def split_metric(dotted: str) -> tuple[str, str]:
    """``('synthetic', 'srcc')`` for ``synthetic.srcc``; a clear error for a metric the bootstrap cannot resample."""
    block, _, name = dotted.rpartition(".")
    if not block or "." in block or name not in METRICS:
        raise PromotionError(
            f"promotion.metric '{dotted}' cannot be resampled — use <block>.<{'|'.join(METRICS)}> with a block "
            "of metrics.json (synthetic, a dataset name or <name>_test), e.g. synthetic.srcc"
        )
    if name == "srcc_within" and block != "synthetic":
        raise PromotionError(f"promotion.metric '{dotted}': srcc_within exists for the synthetic set only")
    return block, name


def read_scores(eval_dir: Path, block: str) -> Scores:
    """The per-image scores of ``block`` in an evaluate output folder (synthetic_scores.csv or scores_<dataset>.csv)."""
    if block == "synthetic":
        rows = _rows(eval_dir / "synthetic_scores.csv")
        keys = [(r["image_id"], r["distortion"], int(r["level"])) for r in rows]
        items = Items(
            target=-np.array([k[2] for k in keys], float),
            units=unit_index([k[0] for k in keys]),
            groups=unit_index([f"{k[0]}/{k[1]}" for k in keys]),
        )
    else:
        label = block.removesuffix("_test") if not (eval_dir / f"scores_{block}.csv").is_file() else block
        rows = _rows(eval_dir / f"scores_{label}.csv")
        if label != block:  # <dataset>_test: the official test split
            rows = [r for r in rows if r["split"] == "test"]
        keys = [(r["path"], r["mos"], r["split"]) for r in rows]
        items = Items(target=np.array([float(r["mos"]) for r in rows]), units=np.arange(len(rows)))
    if not rows:
        raise PromotionError(f"no per-image scores of '{block}' in {eval_dir} — rerun the evaluate stage (dvc repro)")
    has_base = all(r.get("baseline_score") not in (None, "") for r in rows)
    base = np.array([float(r["baseline_score"]) for r in rows]) if has_base else None
    return Scores(items, keys, np.array([float(r["score"]) for r in rows]), base)


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise PromotionError(f"no per-image scores at {path} — rerun the evaluate stage (`dvc repro`)")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# The champion, re-scored on this run's evaluation data


def current_champion(client, name: str, cfg: PromotionConfig) -> str | None:
    """The version that holds the alias, None without one."""
    version = client.get_registered_model(name).aliases.get(cfg.alias)
    return None if version is None else str(version)


Evaluator = Callable[[Any, Path], object]  # (model, out folder): writes an evaluate output folder there


def score_champion(project: Path, name: str, version: str, digest: str, evaluate: Evaluator) -> Path:
    """The evaluate output folder of champion ``version`` on this run's evaluation data: cached in
    ``outputs/promotion`` by version and ``digest``, else made by ``evaluate`` (the evaluate stage's
    code, `synthetic_evaluator`, or the plus stage's, `plus_evaluator`)."""
    out = project / CACHE_DIR / f"{name}-v{version}-{digest}"
    if (out / "metrics.json").is_file():
        return out
    from ..checkpoint import load_checkpoint
    from .tracking_mlflow import download_model

    local, _ = download_model(f"models:/{name}/{version}", project)
    model = load_checkpoint(local / "artifacts" / "checkpoint")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    evaluate(model, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # complete or absent: an interrupted scoring is not a cache entry
    return out


def synthetic_evaluator(project: Path, cfg: EvaluateConfig) -> Evaluator:
    """The evaluate stage's `run_evaluate` on this run's held-out photos and datasets (no
    baseline: the challenger's evaluation has it)."""

    def evaluate(model, out: Path) -> None:
        from ..evaluate import run_evaluate

        run_evaluate(replace(cfg, baseline=False), model, project / stage_paths(project).ingest, out)

    return evaluate


def plus_evaluator(params: dict) -> Evaluator:
    """The plus stage's evaluation (`stages.evaluate_plus`): the test split of ``plus.dataset`` and
    every ``evaluate.datasets`` entry (no baseline: the challenger's evaluation has it)."""

    def evaluate(model, out: Path) -> None:
        from ..plus import load_labelled
        from .stages import evaluate_plus, plus_eval_sets

        evaluate_plus(params, plus_eval_sets(params, load_labelled(params["plus"].dataset)), model, out)

    return evaluate


def champion_scores(
    project: Path,
    name: str,
    version: str,
    cfg: EvaluateConfig,
    eval_dir: Path,
    block: str,
    mine: Scores,
    evaluate: Evaluator,
) -> tuple[np.ndarray, dict[str, float]]:
    """The champion's per-image scores on the challenger's items of ``block``, and its flat metrics."""
    out = score_champion(project, name, version, evaluation_digest(eval_dir, cfg), evaluate)
    theirs = read_scores(out, block)
    if theirs.keys != mine.keys:
        raise PromotionError(
            "its evaluation data differs from this run's (params.yaml or the held-out photos changed "
            "after the evaluate stage ran) — run `dvc repro`, then promote"
        )
    return theirs.scores, flat_metrics(json.loads((out / "metrics.json").read_text()))


# ---------------------------------------------------------------------------------------------
# The decision


def compare(
    cfg: PromotionConfig, mine: Scores, metric: str, others: dict[str, tuple[str, np.ndarray]]
) -> dict[str, Comparison]:
    """``{key: Comparison}`` of this model against each of ``others`` (``key: (label, scores)``),
    by one paired bootstrap: every comparison sees the same resamples."""
    diffs = paired_differences(
        metric, mine.scores, {k: s for k, (_, s) in others.items()}, mine.items, cfg.bootstrap, cfg.seed
    )
    value = point(metric, mine.scores, mine.items)
    out = {}
    for key, (label, theirs) in others.items():
        d, their = diffs[key], point(metric, theirs, mine.items)
        out[key] = Comparison(
            label, their, value - their, lower_bound(d, cfg.confidence), upper_bound(d, cfg.confidence)
        )
    return out


def _cleared(c: Comparison, cfg: PromotionConfig, margin: float) -> bool:
    """Whether the bound at the confidence of the gain over ``c`` clears ``margin``."""
    bound = c.low if cfg.higher_is_better else -c.high
    return bound > margin


def decide(
    client,
    name: str,
    version: str,
    mine: Scores,
    cfg: PromotionConfig,
    champion: tuple[str | None, np.ndarray | None, str | None],
    *,
    dry_run: bool = False,
    baseline: str = ZERO_SHOT,
) -> Decision:
    """Move the alias to ``version`` only if it clears the gate and the champion at the confidence;
    log the decision, write it into the version's description and tag it.

    ``champion``: (its version, its scores on ``mine``'s items, why it could not be scored).
    ``baseline``: what ``mine.baseline`` scored (`ZERO_SHOT`, or `STARTING_MODEL` for QualiCLIP+).
    """
    _, metric = split_metric(cfg.metric)
    champ, champ_scores, champ_error = champion
    value = point(metric, mine.scores, mine.items)
    others: dict[str, tuple[str, np.ndarray]] = {}
    if mine.baseline is not None:
        others["baseline"] = (baseline, mine.baseline)
    if champ_scores is not None and champ != version:
        others["champion"] = (f"{cfg.alias} v{champ}", champ_scores)
    comps = compare(cfg, mine, metric, others) if others else {}
    base, versus = comps.get("baseline"), comps.get("champion")
    failures = []
    if base is None:
        failures.append(
            f"the evaluation has no {baseline} scores to beat — set evaluate.baseline: true "
            "in params.yaml and rerun the pipeline"
        )
    elif not _cleared(base, cfg, 0.0):
        failures.append(f"not better than the {baseline} at {cfg.confidence:g} confidence")
    if cfg.min_value is not None and _gain(value, cfg.min_value, cfg) < 0:
        failures.append(
            f"{'below the floor' if cfg.higher_is_better else 'above the ceiling'} promotion.min_value = {cfg.min_value}"
        )
    if champ is not None and champ != version and champ_error:
        failures.append(f"{cfg.alias} version {champ} cannot be re-scored on this run's images: {champ_error}")
    what = f"version {version} ({cfg.metric} {value:.4f})"
    if champ == version:
        outcome, reason = "unchanged", f"version {version} is already the {cfg.alias} ({cfg.metric} {value:.4f})"
    elif failures:
        outcome, reason = "refused", f"refused {what}: " + "; ".join(failures)
    elif versus is None:
        outcome, reason = "promoted", f"promoted {what}: no {cfg.alias} yet; better than the {baseline}"
    elif _cleared(versus, cfg, cfg.min_improvement):
        outcome = "promoted"
        reason = f"promoted {what}: better than {cfg.alias} version {champ} by more than {cfg.min_improvement:g}"
    else:
        outcome = "kept"
        reason = (
            f"kept {cfg.alias} version {champ}: {what} is not better than it by more than "
            f"{cfg.min_improvement:g} at {cfg.confidence:g} confidence"
        )
    decision = Decision(
        name,
        version,
        outcome == "promoted",
        outcome,
        cfg.metric,
        value,
        base.value if base else None,
        cfg.min_value,
        champ,
        versus.value if versus else None,
        reason,
        n_items=len(mine.scores),
        n_units=mine.items.n_units,
        confidence=cfg.confidence,
        resamples=cfg.bootstrap,
        versus_champion=versus,
        versus_baseline=base,
        min_improvement=cfg.min_improvement,
    )
    decision = replace(decision, reason=f"{reason}{FIGURES_SEP}{figures(decision)}" if others else reason)
    log.log(
        logging.WARNING if outcome == "refused" else logging.INFO,
        "%s%s",
        "(dry run) " if dry_run else "",
        decision.reason,
    )
    if not dry_run:
        if outcome == "promoted":
            client.set_registered_model_alias(name, cfg.alias, version)
        client.set_model_version_tag(name, version, "promotion", decision.reason)
        client.set_model_version_tag(name, version, "promotion.outcome", outcome)
        old = client.get_model_version(name, version).description or ""
        client.update_model_version(name, version, description=description(decision, old))
    return decision


def figures(d: Decision) -> str:
    """One line: both figures on the same n, each difference and its interval, the confidence."""
    parts = [sample(d)]  # after FIGURES_SEP: "… — on the same 480 images of 4 photos, vs …"
    for c in (d.versus_champion, d.versus_baseline):
        if c is not None:
            parts.append(f"vs {c.against} {c.value:.4f}: {c.difference:+.4f} [{c.low:+.4f}, {c.high:+.4f}]")
    return (
        ", ".join(parts)
        + f" ({d.metric}; difference [{1 - d.confidence:g}, {d.confidence:g}] quantiles of {d.resamples} "
        "paired bootstrap resamples)"
    )


def sample(d: Decision) -> str:
    """``600 images of 5 photos`` (synthetic: the resampled unit is the photo), ``1162 images``."""
    photos = f" of {d.n_units} photo{'' if d.n_units == 1 else 's'}" if d.metric.startswith("synthetic.") else ""
    return f"{d.n_items} images{photos}"


HEADLINES = {
    "promoted": "Promoted",
    "kept": "Not promoted",
    "refused": "Not promoted",
    "unchanged": "Already the champion",
}
DESCRIPTION_RULE = "\n\n---\n"  # the decision above it, the train stage's description below


def decision_markdown(d: Decision) -> list[str]:
    """The decision as markdown lines: its outcome, and a table of both figures on the same items."""
    lines = [f"**{HEADLINES[d.outcome]}** — {d.reason.split(FIGURES_SEP)[0]}", ""]
    comps = [c for c in (d.versus_champion, d.versus_baseline) if c is not None]
    if not comps:
        return lines
    lines += [
        f"| {d.metric} on the same {sample(d)} | value | this − it | [{1 - d.confidence:g}, {d.confidence:g}] quantiles |",
        "|---|---:|---:|---:|",
        f"| this model v{d.version} | {d.value:.4f} | | |",
    ]
    lines += [f"| {c.against} | {c.value:.4f} | {c.difference:+.4f} | [{c.low:+.4f}, {c.high:+.4f}] |" for c in comps]
    floor = f", and its figure is not below the floor {d.min_value:g}" if d.min_value is not None else ""
    lines += [
        "",
        f"Promoted only when the lower bound at {d.confidence:g} confidence (the {1 - d.confidence:g} quantile "
        f"of this − it over {d.resamples} paired bootstrap resamples, photos resampled together) is above "
        f"{d.min_improvement:g} against the champion and above 0 against the baseline{floor}.",
    ]
    return lines


def description(d: Decision, old: str) -> str:
    """The version's description: the decision first (what its MLflow page shows on top), then
    what the train stage wrote (kept across reruns of promote)."""
    provenance = old.split(DESCRIPTION_RULE, 1)[1] if DESCRIPTION_RULE in old else old
    return "\n".join(decision_markdown(d)) + (DESCRIPTION_RULE + provenance if provenance else "")


@dataclass(frozen=True)
class Target:
    """What one ``qualiclip promote`` decides on: the QualiCLIP model of the train stage (evaluated
    by the evaluate stage) or, with ``--plus``, the QualiCLIP+ model of the plus stage."""

    name: str  # registered model
    checkpoint: Path
    metrics: Path  # the stage's metrics file; the per-image scores beside it
    stage: str  # the stage that writes ``metrics``
    provenance: dict[str, str]  # version tags besides the metrics
    evaluate: Evaluator  # how the champion is re-scored on the same images
    baseline: str  # what the metrics file's ``baseline`` scored
    by_tags: bool  # whether the version may be found by its tags (no version file)


def qualiclip_target(project: Path, params: dict, checkpoint, metrics_file, shards) -> Target:
    """The train stage's model; paths from dvc.yaml unless given."""
    if None in (checkpoint, metrics_file, shards):  # the paths dvc.yaml names
        paths = stage_paths(project)
        checkpoint = checkpoint or paths.checkpoint
        metrics_file = metrics_file or paths.metrics
        shards = shards or paths.shards
    assert checkpoint and metrics_file and shards  # given, or read from dvc.yaml
    meta = read_metadata(project / checkpoint)
    return Target(
        name=params["tracking"].registered_model,
        checkpoint=project / checkpoint,
        metrics=project / metrics_file,
        stage="evaluate",
        provenance=version_tags(meta, dvc_shards_md5(project, shards), {}),
        evaluate=synthetic_evaluator(project, params["evaluate"]),
        baseline=ZERO_SHOT,
        by_tags=True,
    )


def plus_target(project: Path, params: dict, checkpoint, metrics_file) -> Target:
    """The plus stage's QualiCLIP+ model, registered as ``<tracking.registered_model>-plus``: its
    own champion, judged on its test split (``promotion.plus_metric``) against the model it starts
    from. Paths from dvc.yaml's plus stage unless given."""
    from .paths import plus_paths
    from .stages import PLUS_SUFFIX

    if None in (checkpoint, metrics_file):
        paths = plus_paths(project)
        checkpoint, metrics_file = checkpoint or paths.checkpoint, metrics_file or paths.metrics
    assert checkpoint and metrics_file
    meta = read_metadata(project / checkpoint)
    base = meta.get("base") or {}
    provenance = {f"base.{k}": str(base[k]) for k in ("params_hash", "data_version") if base.get(k)}
    provenance |= {f"split.{k}": v["digest"] for k, v in (meta.get("splits") or {}).items()}
    return Target(
        name=params["tracking"].registered_model + PLUS_SUFFIX,
        checkpoint=project / checkpoint,
        metrics=project / metrics_file,
        stage="plus",
        provenance=provenance,
        evaluate=plus_evaluator(params),
        baseline=STARTING_MODEL,
        by_tags=False,
    )


def promote_project(
    project_dir: str | Path = ".",
    params_file: str = "params.yaml",
    *,
    checkpoint: str | None = None,
    metrics_file: str | None = None,
    shards: str | None = None,
    dry_run: bool = False,
    plus: bool = False,
) -> Decision:
    """Tag the version trained in ``project_dir`` with its evaluation, re-score the champion on the
    same images, and promote the version if it is surely better (see the module docstring).

    The paths default to those of the project's dvc.yaml (`qualiclip.pipeline.paths`); the
    per-image scores are read beside ``metrics_file``. ``plus``: the QualiCLIP+ model of the plus
    stage, through the same gate (`plus_target`; docs/plus.md).
    """
    project = Path(project_dir)
    params = read_params(project / params_file, "promotion", "tracking", "evaluate", *(["plus"] if plus else []))
    cfg = params["promotion"]
    if params["tracking"].backend == "none":
        raise PromotionError("tracking.backend is 'none' in params.yaml: no model version was registered to promote")
    if plus:
        cfg = replace(cfg, metric=cfg.plus_metric)
        target = plus_target(project, params, checkpoint, metrics_file)
    else:
        target = qualiclip_target(project, params, checkpoint, metrics_file, shards)
    mfile = target.metrics
    if not mfile.is_file():
        raise PromotionError(f"no evaluation metrics at {mfile} — run the {target.stage} stage first (dvc repro)")
    metrics = json.loads(mfile.read_text())
    if plus and not metrics:
        raise PromotionError(
            f"{mfile} is empty: the plus stage skipped — name a rated set in plus.dataset, `dvc repro`, then promote"
        )
    metric_value(metrics, cfg.metric)  # fail before touching the registry
    block, _ = split_metric(cfg.metric)
    mine = read_scores(mfile.parent, block)

    from .tracking_mlflow import registry_client, tracking_uri  # mlflow: optional, and seconds to import

    client = registry_client(project)
    name = target.name
    version = find_version(client, name, target.checkpoint, by_tags=target.by_tags)
    if not dry_run:
        for k, v in {**target.provenance, **version_tags({}, None, metrics, provenance=False)}.items():
            client.set_model_version_tag(name, version, k, v)
    champ = current_champion(client, name, cfg)
    champ_scores: np.ndarray | None = None
    champ_metrics: dict[str, float] = {}
    champ_error: str | None = None
    if champ is not None and champ != version:
        try:
            champ_scores, champ_metrics = champion_scores(
                project, name, champ, params["evaluate"], mfile.parent, block, mine, target.evaluate
            )
        except Exception as exc:  # a champion that cannot be scored refuses the challenger, with the reason
            champ_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    champion = (champ, champ_scores, champ_error)
    decision = decide(client, name, version, mine, cfg, champion, dry_run=dry_run, baseline=target.baseline)
    run_id = client.get_model_version(name, version).run_id or None
    experiment = client.get_run(run_id).info.experiment_id if run_id else None
    return replace(
        decision,
        champion_metrics=champ_metrics,
        run_id=run_id,
        experiment_id=experiment,
        tracking_uri=tracking_uri(project),
    )
