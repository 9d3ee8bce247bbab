"""Stage paths have one home, dvc.yaml: the flows, `promote` and `score` read their defaults from it."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qualiclip.pipeline.paths import StagePathError, StagePaths, stage_paths

ROOT = Path(__file__).resolve().parents[1]


def test_the_projects_paths_are_its_stage_arguments():
    assert stage_paths(ROOT) == StagePaths(
        ingest="data/ingest",
        shards="data/shards",
        train="outputs/train",
        checkpoint="outputs/train/checkpoint",
        evaluate="outputs/eval",
        metrics="outputs/eval/metrics.json",
    )


def test_a_path_moved_in_dvc_yaml_moves_the_score_default(tmp_path, monkeypatch, capsys):
    """`qualiclip score` without --model scores with the checkpoint dvc.yaml's evaluate stage names."""
    from qualiclip.checkpoint import save_checkpoint
    from qualiclip.model import ModelConfig, create_model
    from qualiclip.pipeline.cli import main
    from qualiclip.scoring import score_paths

    text = (ROOT / "dvc.yaml").read_text().replace("outputs/train/checkpoint", "models/ckpt")
    (tmp_path / "dvc.yaml").write_text(text)
    assert stage_paths(tmp_path).checkpoint == "models/ckpt"
    model = create_model(ModelConfig(seed=3))
    save_checkpoint(model, tmp_path / "models" / "ckpt")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    assert main(["score", "a.png", "--out", "s.csv", "--no-progress"]) == 0
    score = float(next(csv.DictReader(open(tmp_path / "s.csv")))["score"])
    assert score == pytest.approx(score_paths([tmp_path / "a.png"], model)[0].score, abs=1e-6)

    (tmp_path / "dvc.yaml").unlink()
    assert main(["score", "a.png", "--out", "s.csv"]) == 2
    assert "no dvc.yaml at dvc.yaml — run from the project folder" in capsys.readouterr().err


def test_a_stage_command_without_the_argument_is_named(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages:\n  ingest:\n    cmd: qualiclip ingest --params params.yaml\n")
    with pytest.raises(StagePathError, match="the 'ingest' stage's cmd has no '--out PATH' argument"):
        stage_paths(tmp_path)
