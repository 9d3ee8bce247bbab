"""Champion promotion on a real SQLite MLflow registry in a temp folder (no servers, no training).

Each test registers versions under its own model name in one module-scoped store; a version is a
registry entry plus the files the train and evaluate stages leave in a project.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from qualiclip.config import ConfigError  # noqa: E402
from qualiclip.errors import QualiclipError  # noqa: E402
from qualiclip.pipeline.promotion import (  # noqa: E402
    VERSION_FILE,
    PromotionConfig,
    PromotionError,
    dvc_shards_md5,
    is_better,
    metric_value,
    promote_project,
)

DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The project folder holding ``mlflow.db`` and a client on it."""
    from mlflow import MlflowClient

    project = tmp_path_factory.mktemp("registry")
    shutil.copy(DVC_YAML, project)  # promote reads the stage paths from it
    uri = f"sqlite:///{project / 'mlflow.db'}"
    return project, MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(autouse=True)
def _project_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


def train_and_evaluate(
    store,
    name: str,
    srcc: float,
    *,
    version_file: bool = True,
    promotion: str = "promotion: {}\n",
    baseline: float | None = -0.5,
) -> str:
    """Register a version of ``name`` and leave the files of its train + evaluate stages; its
    evaluation scored the zero-shot baseline at ``baseline`` (None: evaluate.baseline was off)."""
    project, client = store
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    mv = client.create_model_version(name, source=str(project), tags={"params_hash": f"p{srcc}", "data_version": "idx"})
    ckpt = project / "outputs/train/checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "metadata.json").write_text(json.dumps({"params_hash": f"p{srcc}", "data_version": "idx"}))
    (ckpt.parent / VERSION_FILE).unlink(missing_ok=True)
    if version_file:
        (ckpt.parent / VERSION_FILE).write_text(json.dumps({"name": name, "version": str(mv.version)}))
    (project / "outputs/eval").mkdir(parents=True, exist_ok=True)
    metrics = {"synthetic": {"srcc": srcc, "plcc": 0.5, "per_distortion": {"jpeg": 0.1}}, "n_synthetic": 10}
    if baseline is not None:
        metrics["baseline"] = {"synthetic": {"srcc": baseline, "plcc": baseline}}
    (project / "outputs/eval/metrics.json").write_text(json.dumps(metrics))
    (project / "params.yaml").write_text(f"tracking: {{registered_model: {name}}}\n{promotion}")
    return str(mv.version)


def champion(store, name: str) -> str | None:
    version = store[1].get_registered_model(name).aliases.get("champion")  # an int in MLflow 3
    return None if version is None else str(version)


def test_first_version_becomes_champion_and_carries_its_metrics_as_tags(store):
    v1 = train_and_evaluate(store, "first", 0.40)
    d = promote_project(store[0])
    assert d.promoted and d.champion_version is None and "no champion yet" in d.reason
    assert champion(store, "first") == v1
    tags = store[1].get_model_version("first", v1).tags
    assert float(tags["eval.synthetic.srcc"]) == 0.40
    assert float(tags["eval.synthetic.per_distortion.jpeg"]) == 0.1
    assert tags["params_hash"] == "p0.4" and tags["data_version"] == "idx"  # the checkpoint's shard index hash
    assert "dvc_shards_md5" not in tags  # no dvc.lock


def test_better_version_takes_the_alias_worse_and_equal_ones_do_not(store):
    v1 = train_and_evaluate(store, "ladder", 0.40)
    promote_project(store[0])
    v2 = train_and_evaluate(store, "ladder", 0.55)
    assert promote_project(store[0]).promoted and champion(store, "ladder") == v2
    v3 = train_and_evaluate(store, "ladder", 0.30)
    d = promote_project(store[0])
    assert not d.promoted and d.champion_version == v2 and champion(store, "ladder") == v2
    assert "kept champion version" in store[1].get_model_version("ladder", v3).tags["promotion"]
    train_and_evaluate(store, "ladder", 0.55)
    assert not promote_project(store[0]).promoted and champion(store, "ladder") == v2
    assert v1 != v2


def test_rerun_of_the_champion_is_a_no_op(store):
    v1 = train_and_evaluate(store, "again", 0.4)
    promote_project(store[0])
    d = promote_project(store[0])
    assert not d.promoted and "already the champion" in d.reason and champion(store, "again") == v1


def test_lower_is_better_metric_and_min_improvement_from_params(store):
    cfg = "promotion: {metric: synthetic.plcc, higher_is_better: false, min_improvement: 0.1, min_value: 0.9}\n"
    train_and_evaluate(store, "lower", 0.4, promotion=cfg, baseline=0.6)  # plcc 0.5 < baseline 0.6 < ceiling 0.9
    assert promote_project(store[0]).promoted
    assert is_better(0.3, 0.5, PromotionConfig(higher_is_better=False, min_improvement=0.1))
    assert not is_better(0.45, 0.5, PromotionConfig(higher_is_better=False, min_improvement=0.1))


def test_first_version_worse_than_its_zero_shot_baseline_is_refused(store):
    """The issue's first run: SRCC -0.048 against the untrained baseline's 0.030 became champion."""
    v1 = train_and_evaluate(store, "gate", -0.048, baseline=0.030)
    d = promote_project(store[0])
    assert not d.promoted and champion(store, "gate") is None
    assert d.outcome == "refused" and d.baseline_value == 0.030
    assert "not better than the zero-shot baseline (synthetic.srcc 0.0300)" in d.reason
    tags = store[1].get_model_version("gate", v1).tags
    assert tags["promotion.outcome"] == "refused" and tags["promotion"] == d.reason
    v2 = train_and_evaluate(store, "gate", 0.031, baseline=0.030)
    assert promote_project(store[0]).promoted and champion(store, "gate") == v2


def test_floor_is_a_gate_even_above_the_baseline_and_the_champion(store):
    train_and_evaluate(store, "floor", -0.2, baseline=-0.4, promotion="promotion: {min_value: -0.1}\n")
    d = promote_project(store[0])
    assert not d.promoted and "beyond the floor promotion.min_value = -0.1" in d.reason
    assert champion(store, "floor") is None
    train_and_evaluate(store, "floor", -0.05, baseline=-0.4, promotion="promotion: {min_value: -0.1}\n")
    assert promote_project(store[0]).promoted


def test_without_a_baseline_nothing_is_promoted_and_the_reason_names_the_fix(store, caplog):
    train_and_evaluate(store, "nobase", 0.9, baseline=None)
    with caplog.at_level("WARNING", logger="qualiclip.pipeline.promotion"):
        d = promote_project(store[0])
    assert not d.promoted and d.outcome == "refused" and champion(store, "nobase") is None
    assert "no zero-shot baseline to beat (baseline.synthetic.srcc) — set evaluate.baseline: true" in d.reason
    assert d.reason in caplog.text


def test_version_found_by_tags_without_the_version_file(store):
    v1 = train_and_evaluate(store, "bytags", 0.4, version_file=False)
    assert promote_project(store[0]).version == v1


def test_dry_run_changes_nothing(store):
    train_and_evaluate(store, "dry", 0.4)
    d = promote_project(store[0], dry_run=True)
    assert d.promoted and champion(store, "dry") is None


def test_clear_errors(store, tmp_path):
    shutil.copy(DVC_YAML, tmp_path)
    with pytest.raises(PromotionError, match=r"metric 'synthetic.sroc' not in .*have: .*synthetic.srcc"):
        metric_value({"synthetic": {"srcc": 0.1}}, "synthetic.sroc")
    (tmp_path / "params.yaml").write_text("promotion: {metrc: x}\n")
    with pytest.raises(ConfigError, match="did you mean 'metric'"):
        promote_project(tmp_path)
    (tmp_path / "params.yaml").write_text("tracking: {backend: none}\npromotion: {}\n")
    with pytest.raises(PromotionError, match="backend is 'none'"):
        promote_project(tmp_path)
    (tmp_path / "params.yaml").write_text("tracking: {}\n")
    with pytest.raises(ConfigError, match="has no 'promotion:' section"):
        promote_project(tmp_path)
    (tmp_path / "params.yaml").write_text("tracking: {}\npromotion: {}\n")
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
