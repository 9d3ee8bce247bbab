"""Champion promotion on a real SQLite MLflow registry in a temp folder (no servers, no training).

Each test registers versions under its own model name in one module-scoped store; a version is a
registry entry (whose source holds a real, untrained tiny checkpoint: the champion is re-scored
from it) plus the files the train and evaluate stages leave in a project: metrics.json and the
per-image scores of the held-out synthetic set of a real ingest folder, made up here so that each
test knows how good the new model is.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlflow")

from conftest import make_photos  # noqa: E402

from qualiclip.config import ConfigError  # noqa: E402
from qualiclip.errors import QualiclipError  # noqa: E402
from qualiclip.pipeline.bootstrap import Items, point  # noqa: E402
from qualiclip.pipeline.params import PromotionConfig  # noqa: E402
from qualiclip.pipeline.promotion import (  # noqa: E402
    CACHE_DIR,
    VERSION_FILE,
    PromotionError,
    Scores,
    compare,
    dvc_shards_md5,
    metric_value,
    promote_project,
    read_scores,
)
from qualiclip.pipeline.report import run_report  # noqa: E402

DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"
EVALUATE = "evaluate: {crop: 64, distortions: [gaussian_blur, jpeg], batch_size: 16}\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The project folder holding ``mlflow.db``, a real ingest output (data/ingest, as dvc.yaml
    names it) with held-out photos, one real checkpoint the versions' sources share, and a client."""
    from mlflow import MlflowClient

    from qualiclip.checkpoint import save_checkpoint
    from qualiclip.model import ModelConfig, create_model

    project = tmp_path_factory.mktemp("registry")
    shutil.copy(DVC_YAML, project)  # promote reads the stage paths from it
    photos = make_photos(project / "photos", n=10, size=(72, 96))
    ingest(project, photos)
    save_checkpoint(create_model(ModelConfig(name="qualiclip-tiny-rn", seed=3)), project / "model/artifacts/checkpoint")
    uri = f"sqlite:///{project / 'mlflow.db'}"
    return project, MlflowClient(tracking_uri=uri, registry_uri=uri)


def ingest(project: Path, photos: Path) -> None:
    from qualiclip.ingest import IngestConfig, run_ingest

    cfg = IngestConfig(sources=(str(photos),), min_size=64, val_fraction=0.5, workers=1)
    run_ingest(cfg, project / "data/ingest", progress=False)


@pytest.fixture(autouse=True)
def _project_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


def synthetic_keys(project: Path) -> list[tuple[str, str, int]]:
    """(image_id, distortion, level) of every item of the project's held-out synthetic set."""
    from qualiclip.evaluate import build_synthetic_set
    from qualiclip.schema import EvaluateConfig

    s = build_synthetic_set(project / "data/ingest", EvaluateConfig(crop=64, distortions=("gaussian_blur", "jpeg")))
    return list(zip(s.image_ids, s.distortions, s.levels.tolist()))


def made_up(keys, strength: float, seed: int) -> np.ndarray:
    """Scores that follow the quality (-level) with ``strength`` noise standard deviations per level."""
    levels = np.array([k[2] for k in keys], float)
    return -strength * levels + np.random.default_rng(seed).normal(size=len(keys))


def train_and_evaluate(
    store,
    name: str,
    strength: float | None = 3.0,
    *,
    scores: np.ndarray | None = None,
    version_file: bool = True,
    promotion: str = "promotion: {}\n",
    baseline: float | None = -3.0,
    seed: int = 0,
    tags: dict | None = None,
    source: str = "model",
) -> str:
    """Register a version of ``name`` and leave the files of its train + evaluate stages: per-image
    scores of ``strength`` (or ``scores``) and the zero-shot baseline's of ``baseline`` (None:
    evaluate.baseline was off); metrics.json holds the figures they give."""
    project, client = store
    filter = f"name = '{name}'"
    if not client.search_registered_models(filter):
        client.create_registered_model(name)
    phash = f"p{name}{len(client.search_model_versions(filter))}"
    mv = client.create_model_version(
        name, source=str(project / source), tags={"params_hash": phash, "data_version": "idx", **(tags or {})}
    )
    ckpt = project / "outputs/train/checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "metadata.json").write_text(json.dumps({"params_hash": phash, "data_version": "idx"}))
    (ckpt.parent / VERSION_FILE).unlink(missing_ok=True)
    if version_file:
        (ckpt.parent / VERSION_FILE).write_text(json.dumps({"name": name, "version": str(mv.version)}))
    keys = synthetic_keys(project)
    mine = made_up(keys, strength, seed) if scores is None else scores
    base = made_up(keys, baseline, seed + 1) if baseline is not None else None
    out = project / "outputs/eval"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "synthetic_scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "distortion", "level", "score", "baseline_score"])
        for i, k in enumerate(keys):
            w.writerow([*k, mine[i], "" if base is None else base[i]])
    items = read_scores(out, "synthetic").items
    metrics: dict = {"synthetic": {"srcc": point("srcc", mine, items), "plcc": point("plcc", mine, items)}}
    metrics["synthetic"]["per_distortion"] = {"jpeg": 0.1}
    metrics["n_synthetic"] = len(keys)
    if base is not None:
        metrics["baseline"] = {"synthetic": {"srcc": point("srcc", base, items), "plcc": point("plcc", base, items)}}
    (out / "metrics.json").write_text(json.dumps(metrics))
    (project / "params.yaml").write_text(f"tracking: {{registered_model: {name}}}\n{EVALUATE}{promotion}")
    return str(mv.version)


def champion(store, name: str) -> str | None:
    version = store[1].get_registered_model(name).aliases.get("champion")  # an int in MLflow 3
    return None if version is None else str(version)


def test_first_version_becomes_champion_and_carries_its_metrics_as_tags(store):
    v1 = train_and_evaluate(store, "first", 3.0)
    d = promote_project(store[0])
    assert d.promoted and d.champion_version is None and "no champion yet" in d.reason
    assert champion(store, "first") == v1
    tags = store[1].get_model_version("first", v1).tags
    metrics = json.loads((store[0] / "outputs/eval/metrics.json").read_text())
    assert float(tags["eval.synthetic.srcc"]) == metrics["synthetic"]["srcc"] == pytest.approx(d.value)
    assert float(tags["eval.synthetic.per_distortion.jpeg"]) == 0.1
    assert tags["params_hash"] == "pfirst0" and tags["data_version"] == "idx"  # the checkpoint's shard index hash
    assert "dvc_shards_md5" not in tags  # no dvc.lock


def test_version_description_starts_with_the_decision_and_keeps_the_train_stages(store):
    """The first thing on the version's MLflow page: the outcome, both figures on the same n, the
    difference, its interval and the confidence; then what the train stage wrote."""
    project, client = store
    v1 = train_and_evaluate(store, "described", 3.0)
    client.update_model_version("described", v1, description="params hash p; data version idx; 300 steps")
    d = promote_project(project)
    text = client.get_model_version("described", v1).description
    assert text.startswith(f"**Promoted** — promoted version {v1} (synthetic.srcc {d.value:.4f})")
    n, units = d.n_items, d.n_units
    assert (
        f"| synthetic.srcc on the same {n} images of {units} photos | value | this − it | [0.05, 0.95] quantiles |"
        in text
    )
    b = d.versus_baseline
    assert f"| zero-shot baseline | {b.value:.4f} | {b.difference:+.4f} | [{b.low:+.4f}, {b.high:+.4f}] |" in text
    assert text.endswith("---\nparams hash p; data version idx; 300 steps")
    tag = client.get_model_version("described", v1).tags["promotion"]
    assert tag == d.reason and tag.startswith(f"promoted version {v1} (synthetic.srcc {d.value:.4f}): no champion yet")
    assert (
        f" — on the same {n} images of {units} photos, vs zero-shot baseline {b.value:.4f}: {b.difference:+.4f} " in tag
    )
    promote_project(project)  # a rerun replaces the decision, keeps the provenance once
    again = client.get_model_version("described", v1).description
    assert again.startswith("**Already the champion**") and again.count("300 steps") == 1


def test_champion_is_rescored_on_the_same_images_and_its_old_tag_is_never_the_comparison(store):
    """The issue's run: photos added between two runs; the champion's tag (from its own, earlier
    evaluation) is higher than the new model's figure, but re-scored on this run's images it is
    lower: it loses, and both figures are on the same n."""
    project, client = store
    v1 = train_and_evaluate(store, "rescore", scores=np.array([-k[2] for k in synthetic_keys(project)], float))
    first = promote_project(project)
    assert first.promoted and first.value == 1.0  # its own evaluation: perfect, and tagged so
    assert float(client.get_model_version("rescore", v1).tags["eval.synthetic.srcc"]) == 1.0
    make_photos(project / "photos/added", n=6, size=(72, 96), seed=7)
    ingest(project, project / "photos")  # more held-out photos: another evaluation set
    v2 = train_and_evaluate(store, "rescore", 3.0)
    d = promote_project(project)
    assert d.promoted and d.champion_version == v1 and champion(store, "rescore") == v2
    n = len(synthetic_keys(project))
    assert d.n_items == n > first.n_items and d.champion_metrics["n_synthetic"] == n  # the same images
    assert d.champion_value == pytest.approx(d.champion_metrics["synthetic.srcc"])  # its evaluation on these images
    assert d.champion_value < d.value < 1.0  # lower than the new model's, though its tag says 1.0
    assert d.versus_champion.value == d.champion_value and d.versus_champion.low > 0
    cached = list((project / CACHE_DIR).glob(f"rescore-v{v1}-*/metrics.json"))
    assert len(cached) == 1  # scored once, by promote, out of every DVC stage's outputs
    report = run_report(d, json.loads((project / "outputs/eval/metrics.json").read_text()), {"evaluate": "Completed"})
    assert report.startswith("## qualiclip retraining: Promoted\n")
    assert f"| **synthetic.srcc** (promotion) | {d.value:.4f} | {d.champion_value:.4f} |" in report
    assert f"| champion v{v1} | {d.champion_value:.4f} | {d.versus_champion.difference:+.4f} |" in report


def test_a_model_no_better_than_the_champion_on_the_same_images_is_kept(store):
    """The champion's own scores on this run's images (its cached re-scoring) as the new model's:
    a zero gain is inside any noise, whatever min_improvement."""
    project, client = store
    train_and_evaluate(store, "tie", 3.0)
    v1 = promote_project(project).version
    train_and_evaluate(store, "tie", 3.0, seed=5, promotion="promotion: {min_value: null}\n")
    promote_project(project, dry_run=True)  # re-scores the champion on these images, changes nothing
    rescored = read_scores(next((project / CACHE_DIR).glob(f"tie-v{v1}-*")), "synthetic")
    v3 = train_and_evaluate(store, "tie", scores=rescored.scores, promotion="promotion: {min_value: null}\n")
    d = promote_project(project)
    assert d.outcome == "kept" and not d.promoted and champion(store, "tie") == v1
    assert d.versus_champion.difference == 0.0 and d.versus_champion.low == 0.0
    assert f"kept champion version {v1}" in client.get_model_version("tie", v3).tags["promotion"]


def test_a_champion_that_cannot_be_scored_refuses_with_the_reason(store):
    project, client = store
    train_and_evaluate(store, "broken", 3.0, source="nowhere")  # its source holds no model
    v1 = promote_project(project).version
    v2 = train_and_evaluate(store, "broken", 5.0)
    d = promote_project(project)
    assert d.outcome == "refused" and champion(store, "broken") == v1
    assert f"champion version {v1} cannot be re-scored on this run's images" in d.reason
    assert client.get_model_version("broken", v2).tags["promotion.outcome"] == "refused"


def test_rerun_of_the_champion_is_a_no_op(store):
    v1 = train_and_evaluate(store, "again", 3.0)
    promote_project(store[0])
    d = promote_project(store[0])
    assert not d.promoted and "already the champion" in d.reason and champion(store, "again") == v1


def test_first_version_worse_than_its_zero_shot_baseline_is_refused(store):
    """The issue's first run: SRCC -0.048 against the untrained baseline's 0.030 became champion."""
    v1 = train_and_evaluate(store, "gate", 0.0, baseline=0.3)
    d = promote_project(store[0])
    assert not d.promoted and champion(store, "gate") is None
    assert d.outcome == "refused" and d.versus_baseline.low < 0
    assert "not better than the zero-shot baseline at 0.95 confidence" in d.reason
    tags = store[1].get_model_version("gate", v1).tags
    assert tags["promotion.outcome"] == "refused" and tags["promotion"] == d.reason
    v2 = train_and_evaluate(store, "gate", 3.0, baseline=0.3)
    assert promote_project(store[0]).promoted and champion(store, "gate") == v2


def test_floor_is_a_gate_even_above_the_baseline(store):
    train_and_evaluate(store, "floor", 0.3, baseline=-3.0, promotion="promotion: {min_value: 0.95}\n")
    d = promote_project(store[0])
    assert not d.promoted and "below the floor promotion.min_value = 0.95" in d.reason
    assert champion(store, "floor") is None
    train_and_evaluate(store, "floor", 30.0, baseline=-3.0, promotion="promotion: {min_value: 0.95}\n")
    assert promote_project(store[0]).promoted


def test_without_a_baseline_nothing_is_promoted_and_the_reason_names_the_fix(store, caplog):
    train_and_evaluate(store, "nobase", 3.0, baseline=None)
    with caplog.at_level("WARNING", logger="qualiclip.pipeline.promotion"):
        d = promote_project(store[0])
    assert not d.promoted and d.outcome == "refused" and champion(store, "nobase") is None
    assert "no zero-shot baseline scores to beat — set evaluate.baseline: true" in d.reason
    assert d.reason in caplog.text


def test_seeded_bootstrap_refuses_a_gain_inside_the_noise_and_promotes_a_clear_one():
    """Per-image scores of 8 photos x 2 types x 5 levels: a challenger that is the champion plus
    noise has a point gain (here positive) whose lower bound is not above 0; a challenger that
    ranks every photo's levels better clears it. The same seed gives the same bounds."""
    rng = np.random.default_rng(0)
    keys = [(f"p{p}", t, lv) for p in range(8) for t in ("blur", "jpeg") for lv in range(1, 6)]
    levels = np.array([k[2] for k in keys], float)
    photo_effect = np.repeat(rng.normal(size=8), 10)  # a photo's content moves all of its scores
    items = Items(-levels, np.repeat(np.arange(8), 10), np.repeat(np.arange(16), 5))
    champ = -levels + 2.0 * photo_effect + rng.normal(size=80)
    cfg = PromotionConfig(confidence=0.95, bootstrap=2000, seed=0)

    def versus(scores):
        return compare(cfg, Scores(items, keys, scores, None), "srcc", {"c": ("champion", champ)})["c"]

    noisy = champ + 0.3 * rng.normal(size=80)
    near = versus(noisy)
    assert near.low <= 0.0 < near.high  # inside the noise: not promoted at min_improvement 0
    clear = versus(-3.0 * levels + 2.0 * photo_effect + rng.normal(size=80))
    assert clear.low > 0.05 and clear.difference > 0.1
    assert versus(noisy) == near  # seeded: the same inputs, the same bounds, the same decision
    other = compare(PromotionConfig(seed=1), Scores(items, keys, noisy, None), "srcc", {"c": ("champion", champ)})["c"]
    assert other.low != near.low  # and the seed is what fixes them


def test_version_found_by_tags_without_the_version_file(store):
    v1 = train_and_evaluate(store, "bytags", 3.0, version_file=False)
    assert promote_project(store[0]).version == v1


def test_dry_run_changes_nothing(store):
    train_and_evaluate(store, "dry", 3.0)
    d = promote_project(store[0], dry_run=True)
    assert d.promoted and champion(store, "dry") is None


def test_clear_errors(store, tmp_path):
    shutil.copy(DVC_YAML, tmp_path)
    with pytest.raises(PromotionError, match=r"metric 'synthetic.sroc' not in .*have: .*synthetic.srcc"):
        metric_value({"synthetic": {"srcc": 0.1}}, "synthetic.sroc")
    (tmp_path / "params.yaml").write_text("promotion: {metrc: x}\n")
    with pytest.raises(ConfigError, match="did you mean 'metric'"):
        promote_project(tmp_path)
    (tmp_path / "params.yaml").write_text("tracking: {backend: none}\nevaluate: {}\npromotion: {}\n")
    with pytest.raises(PromotionError, match="backend is 'none'"):
        promote_project(tmp_path)
    (tmp_path / "params.yaml").write_text("tracking: {}\n")
    with pytest.raises(ConfigError, match="has no 'promotion:' section"):
        promote_project(tmp_path)
    (tmp_path / "params.yaml").write_text("tracking: {}\npromotion: {}\n")
    with pytest.raises(ConfigError, match="has no 'evaluate:' section"):
        promote_project(tmp_path)
    (tmp_path / "params.yaml").write_text("tracking: {}\nevaluate: {}\npromotion: {metric: synthetic.krcc}\n")
    (tmp_path / "outputs/eval").mkdir(parents=True)
    (tmp_path / "outputs/eval/metrics.json").write_text(json.dumps({"synthetic": {"krcc": 0.5}}))
    with pytest.raises(PromotionError, match="'synthetic.krcc' cannot be resampled"):
        promote_project(tmp_path)
    (tmp_path / "outputs/eval/metrics.json").unlink()
    (tmp_path / "params.yaml").write_text("tracking: {}\nevaluate: {}\npromotion: {}\n")
    with pytest.raises(PromotionError, match="run the evaluate stage first"):
        promote_project(tmp_path)
    (tmp_path / "dvc.yaml").unlink()
    with pytest.raises(QualiclipError, match="no dvc.yaml at"):
        promote_project(tmp_path)


def test_dvc_shards_md5_is_the_dvc_lock_hash_of_the_shards(tmp_path):
    assert dvc_shards_md5(tmp_path, "data/shards") is None
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  degrade:\n    outs:\n    - path: data/shards\n      md5: abc123.dir\n"
    )
    assert dvc_shards_md5(tmp_path, "data/shards") == "abc123"


def test_promote_exit_code_3_when_not_promoted_0_when_promoted(store, capsys):
    """A script can tell a refusal (3) from a promotion (0) and from an error (2)."""
    from qualiclip.pipeline.cli import EXIT_NOT_PROMOTED, main

    project = str(store[0])
    train_and_evaluate(store, "exits", 0.0, baseline=0.3)  # not better than its baseline
    assert main(["promote", "--project", project]) == EXIT_NOT_PROMOTED == 3
    assert "promote: refused version" in capsys.readouterr().out
    train_and_evaluate(store, "exits", 3.0)
    assert main(["promote", "--project", project]) == 0
    assert main(["promote", "--project", project]) == 0  # already the champion
    (store[0] / "outputs/eval/metrics.json").unlink()
    assert main(["promote", "--project", project]) == 2  # an error, not a decision
