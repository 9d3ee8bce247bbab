"""The ``evaluate`` stage: held-out synthetic ranking, real IQA datasets, and the baseline.

Synthetic set: every held-out pristine image (ingest split ``val``), centre-cropped, under every
distortion type at every level. The predicted quality should fall as the level rises, so the
correlations are computed against ``-level`` (higher means better on both sides).

Real datasets (``evaluate.datasets``): each is read by `qualiclip.datasets.load_dataset`, scored
at full resolution (or its declared resize rule), and compared with its MOS (docs/method.md, "The evaluation protocol").
Baseline: the same backbone before fine-tuning (the model config stored in the checkpoint),
scored zero-shot with the CLIP-IQA pair 'Good photo.'/'Bad photo.', on the same images — so
every run shows what training added.

Outputs (``out_dir``): ``metrics.json``, the headline metrics (``synthetic``, one block per
dataset and official test split, ``baseline`` with the same blocks), ``per_distortion.csv`` (the
per-type table, kept out of metrics.json so that ``dvc metrics show`` stays readable),
``synthetic_scores.csv``, ``scores_<dataset>.csv`` and ``plots/*.png``. See docs/evaluation.md.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import ConstantInputWarning, spearmanr
from tqdm import tqdm

from .batching import score_arrays
from .datasets import IQADataset, check_datasets
from .device import resolve_device
from .distortions import LEVELS, get_distortion, list_distortions, to_uint8
from .errors import QualiclipError
from .file_scoring import score_paths
from .inference import inference_copy
from .ingest import MANIFEST_FILE, check_crop, images_dir, load_image, read_manifest
from .metrics import correlations
from .model import QualiCLIP, create_clip, encode_prompts
from .plots import plot_model_vs_baseline, plot_mos_scatter, plot_per_distortion, plot_synthetic_scatter
from .prompts import BASELINE_PAIRS
from .sampling import ensure_size
from .schema import EvaluateConfig, ModelConfig

PER_TYPE_KEYS = ("per_distortion", "per_distortion_within")  # synthetic_metrics' per-type blocks


class EvaluateError(QualiclipError, ValueError):
    """An evaluation that cannot run as configured; the message names the fix."""


@dataclass(frozen=True)
class SyntheticSet:
    images: list[np.ndarray]  # uint8 (crop, crop, 3)
    image_ids: list[str]
    distortions: list[str]
    levels: np.ndarray


def build_synthetic_set(ingest_dir: Path, cfg: EvaluateConfig) -> SyntheticSet:
    """Centre crops of the held-out images under every (type, level); deterministic in ``cfg.seed``."""
    rows = read_manifest(ingest_dir, cfg.split)
    if not rows:
        raise EvaluateError(
            f"no '{cfg.split}' images in {ingest_dir}/{MANIFEST_FILE} — ingest more photos or lower ingest.val_fraction"
        )
    check_crop(ingest_dir, rows, cfg.crop, "evaluate.crop")
    names = list(cfg.distortions) or list_distortions()
    images, ids, dists, levels = [], [], [], []
    for r in rows:
        crop = _centre_crop(load_image(images_dir(ingest_dir), r["id"]), cfg.crop)
        for t, name in enumerate(names):
            d = get_distortion(name)
            rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, int(r["id"], 16), t]))
            state = d.draw(rng, cfg.crop, cfg.crop)
            for level in LEVELS:
                images.append(to_uint8(d.apply(crop, level, state)))
                ids.append(r["id"])
                dists.append(name)
                levels.append(level)
    return SyntheticSet(images, ids, dists, np.array(levels))


def _centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    image, _ = ensure_size(image, size)
    h, w = image.shape[:2]
    y, x = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(image[y : y + size, x : x + size], dtype=np.float32) / 255.0


def synthetic_metrics(scores: np.ndarray, s: SyntheticSet) -> dict:
    """Pooled SRCC/PLCC/KRCC against -level, the mean within-(image, type) SRCC, and both per type.

    ``per_distortion`` pools one type's images (it also asks whether level k of one photo scores
    below level k-1 of another); ``per_distortion_within`` averages that type's per-photo SRCC of
    its 5 levels, the ranking the training loss asks for.
    """
    warnings.simplefilter("ignore", ConstantInputWarning)  # a constant group counts as SRCC 0

    target = -s.levels.astype(float)
    overall = correlations(scores, target)
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(s.image_ids, s.distortions)):
        groups.setdefault(key, []).append(i)
    within = {key: _nan0(spearmanr(scores[g], target[g])[0]) for key, g in groups.items()}
    per_type, per_type_within = {}, {}
    for name in dict.fromkeys(s.distortions):
        idx = [i for i, d in enumerate(s.distortions) if d == name]
        per_type[name] = _nan0(spearmanr(scores[idx], target[idx])[0])
        per_type_within[name] = float(np.mean([v for (_, d), v in within.items() if d == name]))
    return {
        "srcc": overall["srcc"],
        "plcc": overall["plcc"],
        "krcc": overall["krcc"],
        "srcc_within": float(np.mean(list(within.values()))),
        "per_distortion": per_type,
        "per_distortion_within": per_type_within,
    }


def _nan0(v: float) -> float:
    return 0.0 if v is None or np.isnan(v) else float(v)


def score_synthetic(
    model: QualiCLIP, s: SyntheticSet, cfg: EvaluateConfig, device, desc: str = "synthetic"
) -> np.ndarray:
    with tqdm(total=len(s.images), desc=f"score {desc}", unit="img", disable=None) as bar:
        return score_arrays(
            model, s.images, batch_size=cfg.batch_size, device=device, precision=cfg.precision, progress=bar
        )


# ---------------------------------------------------------------------------------------------
# Real IQA datasets


@dataclass(frozen=True)
class DatasetRun:
    """One configured dataset and its scores (model and, when asked, the baseline)."""

    label: str
    dataset: IQADataset
    scores: np.ndarray  # (N,) the model
    baseline: np.ndarray | None = None  # (N,) the zero-shot backbone


def score_dataset(model: QualiCLIP, label: str, ds: IQADataset, cfg: EvaluateConfig, device, who: str) -> np.ndarray:
    """Scores of every item of ``ds``, streamed from disk, with the dataset's resize rule."""
    with tqdm(total=len(ds), desc=f"score {label} ({who})", unit="img", disable=None) as bar:
        results = score_paths(
            ds.paths(),
            model,
            batch_size=cfg.batch_size,
            device=device,
            precision=cfg.precision,
            resize_short=ds.resize_short_side,
            progress=bar,
        )
    bad = [r for r in results if r.error]
    if bad:
        raise EvaluateError(
            f"{len(bad)} image(s) of {label} cannot be scored, first {bad[0].path}: {bad[0].error} "
            "— repair or remove them (their labels too), then rerun"
        )
    return np.array([r.score for r in results])


def dataset_blocks(label: str, ds: IQADataset, scores: np.ndarray) -> dict[str, dict]:
    """``{label: {srcc, krcc, plcc, plcc_logistic, n}}`` plus ``{label}_test`` for an official test split."""
    blocks = {label: {**correlations(scores, ds.mos()), "n": len(ds)}}
    if "test" in ds.splits:
        idx = np.array([item.split == "test" for item in ds.items])
        blocks[f"{label}_test"] = {**correlations(scores[idx], ds.mos()[idx]), "n": int(idx.sum())}
    return blocks


def evaluate_datasets(
    model: QualiCLIP,
    datasets: list[tuple[str, IQADataset]],
    cfg: EvaluateConfig,
    device,
    baseline: QualiCLIP | None = None,
) -> list[DatasetRun]:
    """Score each checked real dataset (`check_datasets`) with the model (and the baseline, if given)."""
    runs = []
    for label, ds in datasets:
        scores = score_dataset(model, label, ds, cfg, device, "model")
        base = score_dataset(baseline, label, ds, cfg, device, "baseline") if baseline is not None else None
        runs.append(DatasetRun(label, ds, scores, base))
    return runs


def baseline_model(model_cfg: ModelConfig) -> QualiCLIP:
    """The backbone before fine-tuning with the CLIP-IQA prompt pair ('Good photo.'/'Bad photo.').

    Zero-shot CLIP-IQA scoring of the same architecture and initial weights that training started
    from (``model_cfg``: the evaluated checkpoint's own config), so every evaluation shows what
    training added.
    """
    clip, _ = create_clip(model_cfg)  # the prompts stored in an official file are ignored on purpose
    return QualiCLIP(clip, encode_prompts(clip, model_cfg.name, BASELINE_PAIRS), model_cfg)


def per_distortion_table(model: dict, baseline: dict | None) -> list[dict]:
    """One row per distortion type: the model's pooled and within-photo SRCC, and the baseline's.

    ``model``/``baseline``: `synthetic_metrics` results (with their per-type blocks).
    """
    rows = []
    for name, srcc in model["per_distortion"].items():
        row = {"distortion": name, "srcc": srcc, "srcc_within": model["per_distortion_within"][name]}
        if baseline is not None:
            row |= {
                "baseline_srcc": baseline["per_distortion"][name],
                "baseline_srcc_within": baseline["per_distortion_within"][name],
            }
        rows.append(row)
    return rows


def headline(synthetic: dict) -> dict:
    """A `synthetic_metrics` result without its per-type blocks: what metrics.json holds."""
    return {k: v for k, v in synthetic.items() if k not in PER_TYPE_KEYS}


def write_outputs(
    out_dir: Path,
    metrics: dict,
    per_distortion: list[dict],
    scores: np.ndarray,
    s: SyntheticSet,
    baseline_scores: np.ndarray | None = None,
) -> None:
    """metrics.json, per_distortion.csv and ``synthetic_scores.csv`` (one row per synthetic image:
    image_id, distortion, level, score, baseline_score — empty without a baseline). The per-image
    scores are what ``qualiclip promote`` resamples and re-scores the champion against."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    base = baseline_scores.tolist() if baseline_scores is not None else [""] * len(scores)
    with open(out_dir / "synthetic_scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "distortion", "level", "score", "baseline_score"])
        w.writerows(
            zip(s.image_ids, s.distortions, s.levels.tolist(), scores.tolist(), base)
        )  # unrounded: see model.score_from_similarities
    with open(out_dir / "per_distortion.csv", "w", newline="") as f:
        dw = csv.DictWriter(f, fieldnames=list(per_distortion[0]))
        dw.writeheader()
        dw.writerows(
            {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()} for row in per_distortion
        )


def write_dataset_scores(out_dir: Path, run: DatasetRun) -> Path:
    """``scores_<label>.csv``: path, mos (higher is better), split, score, baseline_score."""
    out = out_dir / f"scores_{run.label}.csv"
    base = run.baseline if run.baseline is not None else [None] * len(run.scores)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "mos", "split", "score", "baseline_score"])
        for item, score, b in zip(run.dataset.items, run.scores, base):
            w.writerow([str(item.path), item.mos, item.split or "", float(score), "" if b is None else float(b)])
    return out


def write_plots(
    out_dir: Path,
    metrics: dict,
    per_distortion: list[dict],
    scores: np.ndarray,
    s: SyntheticSet,
    runs: list[DatasetRun],
) -> None:
    plots = out_dir / "plots"
    plot_synthetic_scatter(scores, s, plots / "synthetic_scatter.png")

    def column(key: str) -> dict[str, float] | None:
        return {r["distortion"]: r[key] for r in per_distortion} if key in per_distortion[0] else None

    plot_per_distortion(
        column("srcc") or {},
        plots / "per_distortion.png",
        baseline=column("baseline_srcc"),
        within=column("srcc_within"),
    )
    for run in runs:
        plot_mos_scatter(
            run.scores,
            run.dataset.mos(),
            plots / f"scatter_{run.label}.png",
            title=f"{run.label} (n={len(run.scores)})",
            mos_range=run.dataset.mos_range,
        )
    if "baseline" in metrics:
        plot_model_vs_baseline(metrics, plots / "model_vs_baseline.png")


def add_dataset_blocks(metrics: dict, runs: list[DatasetRun]) -> None:
    """Each run's `dataset_blocks` into ``metrics``, and its baseline's into ``metrics['baseline']``."""
    for run in runs:
        metrics.update(dataset_blocks(run.label, run.dataset, run.scores))
        if run.baseline is not None:
            metrics.setdefault("baseline", {}).update(dataset_blocks(run.label, run.dataset, run.baseline))


@dataclass(frozen=True)
class Evaluation:
    """What `run_evaluate` measured: the headline metrics (metrics.json) and the per-type table
    (per_distortion.csv)."""

    metrics: dict
    per_distortion: list[dict]


def run_evaluate(
    cfg: EvaluateConfig,
    model: QualiCLIP,
    ingest_dir: Path,
    out_dir: Path,
    datasets: list[tuple[str, IQADataset]] | None = None,
) -> Evaluation:
    """Score the synthetic set, the datasets and the baseline; write metrics.json, CSVs, plots.

    The baseline is built from ``model.cfg``, the config the checkpoint carries. ``datasets``:
    the `check_datasets` of ``cfg`` when the caller has loaded them already (None: load them here).
    """
    device = resolve_device(cfg.device)
    datasets = check_datasets(cfg) if datasets is None else datasets
    s = build_synthetic_set(ingest_dir, cfg)
    model = inference_copy(model)
    scores = score_synthetic(model, s, cfg, device)
    synthetic = synthetic_metrics(scores, s)
    metrics: dict = {"synthetic": headline(synthetic), "n_synthetic": len(s.images)}
    baseline = inference_copy(baseline_model(model.cfg)) if cfg.baseline else None
    base, base_scores = None, None
    if baseline is not None:
        base_scores = score_synthetic(baseline, s, cfg, device, "synthetic (baseline)")
        base = synthetic_metrics(base_scores, s)
        metrics["baseline"] = {"synthetic": headline(base)}
    runs = evaluate_datasets(model, datasets, cfg, device, baseline)
    add_dataset_blocks(metrics, runs)
    per_distortion = per_distortion_table(synthetic, base)
    out_dir = Path(out_dir)
    write_outputs(out_dir, metrics, per_distortion, scores, s, base_scores)
    for run in runs:
        write_dataset_scores(out_dir, run)
    write_plots(out_dir, metrics, per_distortion, scores, s, runs)
    return Evaluation(metrics, per_distortion)


def run_evaluate_datasets(
    cfg: EvaluateConfig,
    model: QualiCLIP,
    datasets: list[tuple[str, IQADataset]],
    out_dir: Path,
    baseline: QualiCLIP | None = None,
) -> Evaluation:
    """`run_evaluate` without the synthetic set: score the rated ``datasets`` (and ``baseline``,
    any model to compare with, on the same images) and write metrics.json (a block per dataset,
    ``baseline`` with the same blocks), ``scores_<label>.csv`` and a MOS scatter per dataset.

    What a model that is judged on rated images alone is evaluated with (the QualiCLIP+ model of
    the plus stage, whose baseline is the QualiCLIP model it starts from; docs/plus.md).
    """
    device = resolve_device(cfg.device)
    model = inference_copy(model)
    baseline = inference_copy(baseline) if baseline is not None else None
    runs = evaluate_datasets(model, datasets, cfg, device, baseline)
    metrics: dict = {}
    add_dataset_blocks(metrics, runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("scores_*.csv"), *out_dir.glob("plots/scatter_*.png")]:
        stale.unlink()  # a dataset dropped from the list leaves no old scores
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    for run in runs:
        write_dataset_scores(out_dir, run)
        plot_mos_scatter(
            run.scores,
            run.dataset.mos(),
            out_dir / "plots" / f"scatter_{run.label}.png",
            title=f"{run.label} (n={len(run.scores)})",
            mos_range=run.dataset.mos_range,
        )
    return Evaluation(metrics, [])
