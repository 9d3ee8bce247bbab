"""Typed stage configs: every params.yaml section builds; unknown keys are named."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from qualiclip.config import ConfigError, build_config, config_fields, load_params, params_hash

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


def stage_configs() -> dict[str, type]:
    """Every section of params.yaml and the config dataclass it builds."""
    from flows.retrain import ScheduleConfig
    from qualiclip.degrade import DegradeConfig
    from qualiclip.evaluate import EvaluateConfig
    from qualiclip.ingest import IngestConfig
    from qualiclip.model import ModelConfig
    from qualiclip.pipeline.promotion import PromotionConfig
    from qualiclip.pipeline.tracking import TrackingConfig
    from qualiclip.train import TrainConfig

    return {"model": ModelConfig, "tracking": TrackingConfig, "ingest": IngestConfig, "degrade": DegradeConfig,
            "train": TrainConfig, "evaluate": EvaluateConfig, "schedule": ScheduleConfig, "promotion": PromotionConfig}


def test_dataclass_defaults_are_the_shipped_params():
    """A config built in Python without params.yaml runs what `dvc repro` runs: one set of defaults."""
    params = load_params(ROOT / "params.yaml")
    configs = stage_configs()
    assert set(params) == set(configs)
    for section, cls in configs.items():
        shipped = config_fields(build_config(cls, params[section], where=section))
        assert shipped == config_fields(cls()), section


def test_embedded_configs_read_their_keys_flat_from_the_section():
    from qualiclip.losses import LossWeights
    from qualiclip.train import TrainConfig

    cfg = build_config(TrainConfig, {"steps": 5, "margin_rank": 0.2, "lambda_neg": 2}, where="train")
    assert cfg.steps == 5 and cfg.loss == LossWeights(margin_rank=0.2, lambda_neg=2.0)
    assert config_fields(cfg)["margin_rank"] == 0.2 and "loss" not in config_fields(cfg)
    assert build_config(TrainConfig, {}, where="train").loss == LossWeights()
    with pytest.raises(ConfigError, match=r"unknown key 'margin_rnak' .* did you mean 'margin_rank'"):
        build_config(TrainConfig, {"margin_rnak": 0.1}, where="train")
    with pytest.raises(ConfigError, match=r"train.lambda_pos must be float, got 'x'"):
        build_config(TrainConfig, {"lambda_pos": "x"}, where="train")


def test_missing_params_file_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_params_hash_is_stable_and_sensitive():
    assert params_hash(Example()) == params_hash(Example())
    assert params_hash(Example()) != params_hash(Example(steps=2))
