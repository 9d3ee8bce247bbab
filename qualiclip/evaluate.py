"""The ``evaluate`` stage: held-out synthetic ranking, optional real IQA datasets, baseline.

Synthetic set: every held-out pristine image (ingest split ``val``), centre-cropped, under every
distortion type at every level. The predicted quality should fall as the level rises, so the
correlations are computed against ``-level`` (higher means better on both sides).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .degrade import _load_image, read_manifest
from .model import ModelConfig, QualiCLIP, create_model
from .sampling import LEVELS, _ensure_size, to_uint8


@dataclass(frozen=True)
class EvaluateConfig:
    seed: int = 0
    split: str = "val"
    crop: int = 224
    distortions: tuple[str, ...] = ()  # empty: every registered type
    batch_size: int = 32
    device: str = "auto"
    baseline: bool = True  # also score the backbone before fine-tuning
    datasets: tuple[dict, ...] = ()  # real IQA sets: {name: clive, root: /path, ...loader options}


@dataclass(frozen=True)
class SyntheticSet:
    images: list[np.ndarray]  # uint8 (crop, crop, 3)
    image_ids: list[str]
    distortions: list[str]
    levels: np.ndarray


def build_synthetic_set(ingest_dir: Path, cfg: EvaluateConfig) -> SyntheticSet:
    """Centre crops of the held-out images under every (type, level); deterministic in ``cfg.seed``."""
    from .distortions import get_distortion, list_distortions

    rows = read_manifest(ingest_dir, cfg.split)
    if not rows:
        raise ValueError(f"no '{cfg.split}' images in {ingest_dir}/manifest.csv — ingest more photos or lower ingest.val_fraction")
    names = list(cfg.distortions) or list_distortions()
    images, ids, dists, levels = [], [], [], []
    for r in rows:
        crop = _centre_crop(_load_image(str(Path(ingest_dir) / "images"), r["id"]), cfg.crop)
        for t, name in enumerate(names):
            d = get_distortion(name)
            rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, int(r["id"], 16), t]))
            state = d.draw(rng, cfg.crop, cfg.crop)
            for level in range(1, LEVELS + 1):
                images.append(to_uint8(d.apply(crop, level, state)))
                ids.append(r["id"])
                dists.append(name)
                levels.append(level)
    return SyntheticSet(images, ids, dists, np.array(levels))


def _centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    image, _ = _ensure_size(image, size)
    h, w = image.shape[:2]
    y, x = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(image[y:y + size, x:x + size], dtype=np.float32) / 255.0


def synthetic_metrics(scores: np.ndarray, s: SyntheticSet) -> dict:
    """Pooled SRCC/PLCC/KRCC against -level, the mean within-(image, type) SRCC, and per type."""
    import warnings

    from scipy.stats import ConstantInputWarning, spearmanr

    from .metrics import correlations

    warnings.simplefilter("ignore", ConstantInputWarning)  # a constant group counts as SRCC 0

    target = -s.levels.astype(float)
    overall = correlations(scores, target)
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(s.image_ids, s.distortions)):
        groups.setdefault(key, []).append(i)
    within = [_nan0(spearmanr(scores[g], target[g])[0]) for g in groups.values()]
    per_type = {}
    for name in dict.fromkeys(s.distortions):
        idx = [i for i, d in enumerate(s.distortions) if d == name]
        per_type[name] = _nan0(spearmanr(scores[idx], target[idx])[0])
    return {
        "srcc": overall["srcc"], "plcc": overall["plcc"], "krcc": overall["krcc"],
        "srcc_within": float(np.mean(within)), "per_distortion": per_type,
    }


def _nan0(v: float) -> float:
    return 0.0 if v is None or np.isnan(v) else float(v)


def score_synthetic(model: QualiCLIP, s: SyntheticSet, cfg: EvaluateConfig, device) -> np.ndarray:
    from tqdm import tqdm

    from .scoring import score_arrays

    with tqdm(total=len(s.images), desc="score synthetic", unit="img") as bar:
        return score_arrays(model, s.images, batch_size=cfg.batch_size, device=device, progress=bar)


def evaluate_datasets(model: QualiCLIP, cfg: EvaluateConfig, device) -> dict[str, dict]:
    """SRCC/PLCC/KRCC (+ logistic PLCC) on each configured real dataset."""
    from .datasets import load_dataset
    from .imageio import read_image
    from .metrics import correlations
    from .scoring import score_arrays

    results = {}
    for spec in cfg.datasets:
        spec = dict(spec)
        ds = load_dataset(spec.pop("name"), spec.pop("root"), **spec)
        images = [_resize_short(read_image(p).pixels, ds.resize_short_side) for p in ds.paths()]
        scores = score_arrays(model, images, batch_size=cfg.batch_size, device=device)
        results[ds.name] = {**correlations(scores, ds.mos()), "n": len(images)}
    return results


def _resize_short(image: np.ndarray, short: int | None) -> np.ndarray:
    if not short:
        return image
    import cv2

    h, w = image.shape[:2]
    s = short / min(h, w)
    return cv2.resize(image, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)


def baseline_model(model_cfg: ModelConfig) -> QualiCLIP:
    """The backbone before fine-tuning, scored with the same prompts: what training added."""
    return create_model(model_cfg)


def write_outputs(out_dir: Path, metrics: dict, scores: np.ndarray, s: SyntheticSet) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    with open(out_dir / "synthetic_scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "distortion", "level", "score"])
        w.writerows(zip(s.image_ids, s.distortions, s.levels.tolist(), np.round(scores, 6).tolist()))
    with open(out_dir / "per_distortion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["distortion", "srcc"])
        w.writerows((k, round(v, 6)) for k, v in metrics["synthetic"]["per_distortion"].items())


def run_evaluate(cfg: EvaluateConfig, model: QualiCLIP, model_cfg: ModelConfig, ingest_dir: Path, out_dir: Path) -> dict:
    """Score the synthetic set (and datasets), write metrics.json + CSVs + plots; return metrics."""
    from .plots import plot_per_distortion, plot_synthetic_scatter
    from .train import resolve_device

    device = resolve_device(cfg.device)
    s = build_synthetic_set(ingest_dir, cfg)
    scores = score_synthetic(model, s, cfg, device)
    metrics: dict = {"synthetic": synthetic_metrics(scores, s), "n_synthetic": len(s.images)}
    if cfg.baseline:
        base = score_synthetic(baseline_model(model_cfg), s, cfg, device)
        metrics["baseline"] = {"synthetic": {k: v for k, v in synthetic_metrics(base, s).items() if k != "per_distortion"}}
    metrics.update(evaluate_datasets(model, cfg, device))
    out_dir = Path(out_dir)
    write_outputs(out_dir, metrics, scores, s)
    plot_synthetic_scatter(scores, s, out_dir / "plots" / "synthetic_scatter.png")
    plot_per_distortion(metrics["synthetic"]["per_distortion"], out_dir / "plots" / "per_distortion.png")
    return metrics
