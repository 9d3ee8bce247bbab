"""`qualiclip promote --plus`: the QualiCLIP+ model of the plus stage through the same quality gate
as QualiCLIP, to a champion of its own, on a real SQLite MLflow registry in a temp folder.

As in tests/test_ops_mlflow.py, each version is a registry entry whose source holds a real tiny
checkpoint (the champion is really re-scored from it, on the challenger's test images) plus the
files the plus stage leaves: its metrics file and per-image scores, written by the evaluate
stage's own writers from scores made up here, so that each test knows how good the model is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlflow")

from test_plus import labelled_set  # noqa: E402

from qualiclip.pipeline.promotion import CACHE_DIR, NOT_PROMOTED, STARTING_MODEL, promote_project  # noqa: E402

DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"
NAME = "mine"  # tracking.registered_model: the plus model is registered as mine-plus
PLUS_NAME = NAME + "-plus"


@pytest.fixture(scope="module")
def store(tmp_path_factory, clive_dir, one_thread):
    """The project (dvc.yaml, params.yaml naming a rated set of 40 photos, mlflow.db), one real tiny
    checkpoint the versions' sources share, and a client of the project's store."""
    from mlflow import MlflowClient

    from qualiclip.checkpoint import save_checkpoint
    from qualiclip.model import ModelConfig, create_model

    project = tmp_path_factory.mktemp("plus-registry")
    shutil.copy(DVC_YAML, project)  # promote reads the plus stage's paths from it
    spec = labelled_set(project / "rated", clive_dir, 40)
    params = {
        "tracking": {"registered_model": NAME},
        "evaluate": {"batch_size": 8, "device": "cpu"},
        "plus": {"dataset": {**spec, "root": "rated"}},  # relative, as a user writes it: promote runs in the project
        "promotion": {"min_value": None},
    }
    (project / "params.yaml").write_text(json.dumps(params))
    save_checkpoint(create_model(ModelConfig(name="qualiclip-tiny-rn", seed=3)), project / "model/artifacts/checkpoint")
    uri = f"sqlite:///{project / 'mlflow.db'}"
    return project, MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(autouse=True)
def _in_project(store, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.chdir(store[0])


def rated_test_split(project: Path):
    """The plus stage's test split of the project's rated set, as `plus_eval_sets` gives it."""
    from qualiclip.pipeline.params import read_params
    from qualiclip.pipeline.stages import plus_eval_sets
    from qualiclip.plus import load_labelled

    params = read_params(project / "params.yaml", "plus", "evaluate")
    label, ds = plus_eval_sets(params, load_labelled(params["plus"].dataset))[0]
    assert label == "test"
    return ds


def plus_run(store, scores: np.ndarray, start: np.ndarray) -> str:
    """Register a version of the plus model and leave what its stage writes: the version file, the
    checkpoint's metadata, and the evaluation of ``scores`` (start: the model it starts from)."""
    project, client = store
    if not client.search_registered_models(f"name = '{PLUS_NAME}'"):
        client.create_registered_model(PLUS_NAME)
    mv = client.create_model_version(PLUS_NAME, source=str(project / "model"), tags={"variant": "qualiclip+"})
    out = project / "outputs/plus"
    (out / "checkpoint").mkdir(parents=True, exist_ok=True)
    meta = {"variant": "qualiclip+", "base": {"params_hash": "p1"}, "splits": {"test": {"n": 8, "digest": "d" * 64}}}
    (out / "checkpoint/metadata.json").write_text(json.dumps(meta))
    (out / "registered_model.json").write_text(json.dumps({"name": PLUS_NAME, "version": str(mv.version)}))
    write_evaluation(project, scores, start)
    return str(mv.version)


def write_evaluation(project: Path, scores: np.ndarray, start: np.ndarray) -> None:
    """The plus stage's evaluation files for these test-split scores, by the evaluate stage's writers."""
    from qualiclip.evaluate import DatasetRun, add_dataset_blocks, write_dataset_scores

    run, metrics = DatasetRun("test", rated_test_split(project), scores, start), {}
    add_dataset_blocks(metrics, [run])
    (project / "outputs/plus_eval").mkdir(parents=True, exist_ok=True)
    (project / "outputs/plus_eval/metrics.json").write_text(json.dumps(metrics))
    write_dataset_scores(project / "outputs/plus_eval", run)


def champion(store) -> str | None:
    version = store[1].get_registered_model(PLUS_NAME).aliases.get("champion")
    return None if version is None else str(version)


def test_the_first_plus_model_becomes_its_champion_and_a_worse_second_is_refused(store, capsys):
    from qualiclip.pipeline.cli import EXIT_NOT_PROMOTED, main

    project, client = store
    mos = rated_test_split(project).mos()
    rng = np.random.default_rng(0)
    v1 = plus_run(store, mos + rng.normal(scale=0.5, size=len(mos)), start=-mos)  # beats the model it starts from
    assert main(["promote", "--plus"]) == 0
    assert champion(store) == v1, capsys.readouterr()
    assert not client.search_registered_models(f"name = '{NAME}'")  # the QualiCLIP model's registry is not touched
    tags = client.get_model_version(PLUS_NAME, v1).tags
    assert tags["promotion.outcome"] == "promoted" and f"better than the {STARTING_MODEL}" in tags["promotion"]
    assert float(tags["eval.test.srcc"]) > 0.9 and tags["split.test"] == "d" * 64 and tags["base.params_hash"] == "p1"

    # the second run is worse than the champion re-scored on its test images (its own made-up
    # figures, tagged above, are never the comparison): refused, exit 3, the champion stays
    v2 = plus_run(store, mos, start=-mos)
    champ_on_test = champion_rescored(project, v1)
    worse = champ_on_test - 10.0 * np.argsort(np.argsort(mos))  # ranks the images close to backwards
    write_evaluation(project, worse, start=-mos)
    assert main(["promote", "--plus"]) == EXIT_NOT_PROMOTED
    assert champion(store) == v1
    d = promote_project(project, plus=True, dry_run=True)
    assert d.outcome in NOT_PROMOTED and d.metric == "test.srcc" and d.champion_version == v1
    assert d.value < d.champion_value and d.versus_champion.low < 0 and d.n_items == len(mos)
    assert d.versus_baseline.against == STARTING_MODEL
    assert client.get_model_version(PLUS_NAME, v2).tags["promotion.outcome"] in NOT_PROMOTED


def champion_rescored(project: Path, version: str) -> np.ndarray:
    """The champion's scores on this run's test images, as promote re-scored it (a dry run fills the cache)."""
    from qualiclip.pipeline.promotion import read_scores

    promote_project(project, plus=True, dry_run=True)
    folder = next((project / CACHE_DIR).glob(f"{PLUS_NAME}-v{version}-*"))
    return read_scores(folder, "test").scores


def test_the_champion_is_rescored_by_the_plus_stages_evaluation_on_the_same_images(store):
    """Its cached evaluation is the plus stage's (test split, its own figures), on the challenger's items."""
    from qualiclip.checkpoint import load_checkpoint
    from qualiclip.metrics import correlations
    from qualiclip.pipeline.promotion import read_scores
    from qualiclip.scoring import score_paths

    project, _ = store
    mos = rated_test_split(project).mos()
    if champion(store) is None:
        plus_run(store, mos, start=-mos)
        promote_project(project, plus=True)
    v = champion(store)
    plus_run(store, mos + 0.1, start=-mos)
    d = promote_project(project, plus=True, dry_run=True)
    folder = next((project / CACHE_DIR).glob(f"{PLUS_NAME}-v{v}-*"))
    cached = read_scores(folder, "test")
    mine = read_scores(project / "outputs/plus_eval", "test")
    assert cached.keys == mine.keys
    model = load_checkpoint(project / "model/artifacts/checkpoint")
    direct = np.array([r.score for r in score_paths([Path(k[0]) for k in mine.keys], model, batch_size=8)])
    np.testing.assert_allclose(cached.scores, direct, atol=1e-6)
    assert d.champion_value == pytest.approx(correlations(direct, mos)["srcc"], abs=1e-9)


def test_without_a_version_file_the_plus_model_is_not_guessed_from_tags(store):
    from qualiclip.pipeline.promotion import PromotionError

    project, _ = store
    mos = rated_test_split(project).mos()
    plus_run(store, mos, start=-mos)
    (project / "outputs/plus/registered_model.json").unlink()
    with pytest.raises(PromotionError, match="no version of .mine-plus. recorded in .* — run the stage"):
        promote_project(project, plus=True)
    (project / "outputs/plus_eval/metrics.json").unlink()
    with pytest.raises(PromotionError, match="no evaluation metrics at .* run the plus stage first"):
        promote_project(project, plus=True)
