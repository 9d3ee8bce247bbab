"""The evaluate stage end to end, as `dvc repro` runs it: synthetic set, a real dataset (the 250
CLIVE images of clive-dev, with an official-style test split), the baseline, CSVs and plots."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from qualiclip.datasets import DatasetError, load_dataset_spec
from qualiclip.evaluate import baseline_model
from qualiclip.model import ModelConfig, create_model

BLOCK = {"srcc", "krcc", "plcc", "plcc_logistic", "n"}


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    """See conftest.one_thread."""


@pytest.fixture(scope="module")
def ingest_dir(kodak_dir, tmp_path_factory):
    """A minimal ingest output: one held-out (val) photo, as the ingest stage lays it out."""
    out = tmp_path_factory.mktemp("ingest")
    (out / "images").mkdir()
    Image.open(kodak_dir / "kodim01.png").convert("RGB").resize((320, 240)).save(out / "images" / "ab12.png")
    (out / "manifest.csv").write_text("id,split,width,height\nab12,val,320,240\n")
    return out


@pytest.fixture(scope="module")
def clive_split_labels(clive_dir, tmp_path_factory):
    """clive-dev's labels with a split column: the last 100 images form the 'test' split."""
    rows = list(csv.DictReader(open(clive_dir / "labels.csv")))
    out = tmp_path_factory.mktemp("labels") / "labels_split.csv"
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "mos", "split"])
        w.writerows([r["image"], r["mos"], "test" if i >= 150 else "train"] for i, r in enumerate(rows))
    return out


def clive_spec(clive_dir, labels) -> dict:
    # resized to 96 px on the short side to keep the test fast; evaluation is full-resolution by default
    return {
        "name": "csv",
        "label": "clive",
        "root": str(labels.parent),
        "labels": labels.name,
        "image_dir": str(clive_dir / "images"),
        "mos_range": [0, 100],
        "lower_is_better": False,
        "resize_short_side": 96,
    }


@pytest.fixture(scope="module")
def evaluated(ingest_dir, clive_dir, clive_split_labels, tmp_path_factory):
    from qualiclip.checkpoint import save_checkpoint
    from qualiclip.pipeline.cli import main

    work = tmp_path_factory.mktemp("eval")
    ckpt = save_checkpoint(create_model(ModelConfig(seed=1)), work / "checkpoint")
    params = {  # the model section is not evaluate's: the checkpoint (seed 1) carries its own config
        "model": {"name": "qualiclip-tiny-rn", "pretrained": None, "seed": 0},
        "tracking": {"backend": "none"},
        "evaluate": {
            "distortions": ["gaussian_blur", "white_noise", "jpeg"],
            "batch_size": 8,
            "device": "cpu",
            "datasets": [clive_spec(clive_dir, clive_split_labels)],
        },
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    rc = main(
        [
            "evaluate",
            "--params",
            str(work / "params.yaml"),
            "--model",
            str(ckpt),
            "--ingest",
            str(ingest_dir),
            "--out",
            str(work / "out"),
        ]
    )
    assert rc == 0
    return work / "out"


def test_synthetic_metrics_within_photo_ranking_per_type_by_hand():
    """Photo a ranks both types right; photo b ranks blur backwards and noise right."""
    from qualiclip.evaluate import SyntheticSet, synthetic_metrics

    levels = np.tile(np.arange(1, 6), 4)
    ids = ["a"] * 10 + ["b"] * 10
    dists = (["blur"] * 5 + ["noise"] * 5) * 2
    good = [0.9, 0.8, 0.7, 0.6, 0.5]
    scores = np.array(good + good + good[::-1] + [0.5, 0.4, 0.3, 0.2, 0.1])
    m = synthetic_metrics(scores, SyntheticSet([None] * 20, ids, dists, levels))
    assert m["per_distortion_within"] == pytest.approx({"blur": 0.0, "noise": 1.0})
    assert m["srcc_within"] == pytest.approx(0.5)
    # pooled noise: a's levels all score above b's, so the pooled ranking is not perfect
    assert m["per_distortion"]["noise"] == pytest.approx(0.5433, abs=1e-4)


@pytest.mark.slow
def test_metrics_have_synthetic_dataset_split_and_baseline_blocks(evaluated):
    m = json.loads((evaluated / "metrics.json").read_text())
    assert set(m["synthetic"]) == {"srcc", "plcc", "krcc", "srcc_within"}  # the per-type table: per_distortion.csv
    assert set(m["clive"]) == BLOCK and m["clive"]["n"] == 250
    assert set(m["clive_test"]) == BLOCK and m["clive_test"]["n"] == 100
    assert set(m["baseline"]) == {"synthetic", "clive", "clive_test"}
    assert set(m["baseline"]["clive"]) == BLOCK
    for block in (m["clive"], m["baseline"]["clive"], m["clive_test"]):
        assert all(-1 <= block[k] <= 1 for k in BLOCK - {"n"})


@pytest.mark.slow
def test_dataset_scores_csv_matches_the_scorer(evaluated, clive_dir):
    from qualiclip.checkpoint import load_checkpoint
    from qualiclip.scoring import score_paths

    rows = list(csv.DictReader(open(evaluated / "scores_clive.csv")))
    assert len(rows) == 250 and list(rows[0]) == ["path", "mos", "split", "score", "baseline_score"]
    assert sum(r["split"] == "test" for r in rows) == 100
    model = load_checkpoint(evaluated.parent / "checkpoint")
    again = score_paths([rows[0]["path"], rows[-1]["path"]], model, resize_short=96)
    np.testing.assert_allclose([r.score for r in again], [float(rows[0]["score"]), float(rows[-1]["score"])], atol=2e-6)
    assert rows[0]["score"] != rows[0]["baseline_score"]


@pytest.mark.slow
def test_baseline_is_built_from_the_checkpoints_own_config(evaluated):
    """params.yaml's model section says seed 0; the checkpoint was trained from seed 1: the baseline
    is the checkpoint's starting point, so its scores are those of the seed-1 backbone."""
    from qualiclip.scoring import score_paths

    row = next(csv.DictReader(open(evaluated / "scores_clive.csv")))
    own, params = (
        score_paths([row["path"]], baseline_model(ModelConfig(seed=s)), resize_short=96)[0].score for s in (1, 0)
    )
    assert float(row["baseline_score"]) == pytest.approx(own, abs=2e-6)
    assert abs(own - params) > 1e-4


@pytest.mark.slow
def test_csvs_and_plots_are_written(evaluated):
    per = list(csv.DictReader(open(evaluated / "per_distortion.csv")))
    assert list(per[0]) == ["distortion", "srcc", "srcc_within", "baseline_srcc", "baseline_srcc_within"]
    assert {r["distortion"] for r in per} == {"gaussian_blur", "white_noise", "jpeg"}
    assert len(list(csv.DictReader(open(evaluated / "synthetic_scores.csv")))) == 3 * 5
    for name in ("synthetic_scatter", "per_distortion", "scatter_clive", "model_vs_baseline"):
        assert (evaluated / "plots" / f"{name}.png").stat().st_size > 5_000


def test_baseline_is_the_backbone_with_the_clip_iqa_pair():
    from qualiclip.prompts import BASELINE_PAIRS

    cfg = ModelConfig()
    base = baseline_model(cfg)
    assert base.prompt_features.shape[0] == 2 * len(BASELINE_PAIRS) == 2
    trained_init = create_model(cfg)  # same seed: the same initial weights training starts from
    a, b = base.visual.state_dict(), trained_init.visual.state_dict()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_dataset_spec_errors_name_the_fix(clive_dir, clive_split_labels):
    with pytest.raises(DatasetError, match="root"):
        load_dataset_spec({"name": "clive"})
    bad = {**clive_spec(clive_dir, clive_split_labels), "label": "synthetic"}
    with pytest.raises(DatasetError, match="label"):
        load_dataset_spec(bad)


def test_a_crop_larger_than_the_images_is_refused_before_any_is_read(ingest_dir):
    """evaluate.crop far above the photos upscaled each one (minutes, gigabytes); the manifest's
    sizes refuse it before any image is decoded, naming both fixes."""
    from qualiclip.config import ConfigError
    from qualiclip.evaluate import EvaluateConfig, build_synthetic_set

    assert len(build_synthetic_set(ingest_dir, EvaluateConfig(crop=240, distortions=("jpeg",))).images) == 5
    for crop in (241, 16_384):  # 16384: the largest crop the schema allows
        with pytest.raises(
            ConfigError,
            match=rf"evaluate.crop is {crop} px, larger than the shorter side of 1 of the 1 "
            r"images in .*manifest.csv \(smallest: 240 px, ab12\) — set evaluate.crop "
            rf"to at most 240, or raise ingest.min_size to {crop}",
        ):
            build_synthetic_set(ingest_dir, EvaluateConfig(crop=crop, distortions=("jpeg",)))
