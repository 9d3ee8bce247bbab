"""Typed stage configs: every params.yaml section builds; unknown keys are named."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from qualiclip.config import ConfigError, build_config, load_params, params_hash

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Example:
    steps: int = 1
    lr: float = 0.1
    names: tuple[str, ...] = ()
    device: str | None = None


def test_unknown_key_is_named_with_close_match():
    with pytest.raises(ConfigError, match=r"unknown key 'stpes' in params section 'train' — did you mean 'steps'"):
        build_config(Example, {"stpes": 3}, where="train")


def test_values_are_coerced_and_checked():
    cfg = build_config(Example, {"steps": 3, "lr": 1, "names": ["a", "b"]}, where="x")
    assert cfg == Example(steps=3, lr=1.0, names=("a", "b"))
    with pytest.raises(ConfigError, match=r"x.steps must be int, got 'three'"):
        build_config(Example, {"steps": "three"}, where="x")
    with pytest.raises(ConfigError, match="must be int"):
        build_config(Example, {"steps": True}, where="x")


def test_every_stage_section_of_the_shipped_params_builds():
    from qualiclip.degrade import DegradeConfig
    from qualiclip.evaluate import EvaluateConfig
    from qualiclip.ingest import IngestConfig
    from qualiclip.model import ModelConfig
    from qualiclip.pipeline.tracking import TrackingConfig
    from qualiclip.train import TrainConfig

    params = load_params(ROOT / "params.yaml")
    for section, cls in [("model", ModelConfig), ("tracking", TrackingConfig), ("ingest", IngestConfig),
                         ("degrade", DegradeConfig), ("train", TrainConfig), ("evaluate", EvaluateConfig)]:
        assert isinstance(build_config(cls, params[section], where=section), cls)


def test_missing_params_file_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_params_hash_is_stable_and_sensitive():
    assert params_hash(Example()) == params_hash(Example())
    assert params_hash(Example()) != params_hash(Example(steps=2))
