"""Typed stage configs: every params.yaml section builds; unknown keys, bad values and bad files are named."""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from qualiclip.config import ConfigError, build_config, config_fields, load_params
from qualiclip.identity import params_hash
from qualiclip.train import TrainConfig

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


def test_dataclass_defaults_are_the_shipped_params():
    """A config built in Python without params.yaml runs what `dvc repro` runs: one set of defaults."""
    from qualiclip.pipeline.params import sections

    params = load_params(ROOT / "params.yaml")
    assert set(params) == set(sections())
    for section, cls in sections().items():
        shipped = config_fields(build_config(cls, params[section], where=section))
        assert shipped == config_fields(cls()), section


def test_embedded_configs_read_their_keys_flat_from_the_section():
    from qualiclip.losses import LossWeights

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


# ---------------------------------------------------------------------------------------------
# Issue 19: a params file is read strictly and checked whole, each value against the range
# declared beside its field


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_a_key_written_twice_is_refused_with_both_lines(tmp_path):
    """YAML keeps the last of two equal keys; a params file must not (it hid a setting)."""
    path = write(tmp_path, "train:\n  steps: 300\n  lr: 0.1\n  steps: 5\n")
    with pytest.raises(
        ConfigError,
        match=r"params.yaml, line 4, column 3: key 'steps' is written twice in one "
        r"mapping \(first at line 2\) — keep one$",
    ):
        load_params(path)
    with pytest.raises(ConfigError, match="key 'train' is written twice"):
        load_params(write(tmp_path, "train: {}\nmodel: {}\ntrain: {steps: 3}\n"))


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("train:\n  steps: [300\n", "line 3, column 1"),
        ("train:\n\tsteps: 3\n", "line 2, column 1"),
        ("train: {steps: 3}}\n", "line 1, column 18"),
    ],
)
def test_yaml_syntax_errors_name_line_and_column(tmp_path, text, where):
    with pytest.raises(ConfigError, match=rf"params.yaml, {where}: .* — fix the YAML$"):
        load_params(write(tmp_path, text))


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n", "---\n"])
def test_an_empty_params_file_is_refused(tmp_path, text):
    with pytest.raises(ConfigError, match="params.yaml is empty — a params file holds one section per stage"):
        load_params(write(tmp_path, text))


def test_aliases_of_whole_mappings_are_refused(tmp_path):
    """A "billion laughs" (nested list aliases) would expand exponentially when hashed or logged;
    an alias of one value stays allowed."""
    laughs = "a: &a [x, x, x]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]\n"
    with pytest.raises(ConfigError, match=r"line 2, column 8: the alias \*a repeats a whole mapping or list"):
        load_params(write(tmp_path, laughs))
    assert load_params(write(tmp_path, "train: {steps: &n 3, log_every: *n}\n")) == {
        "train": {"steps": 3, "log_every": 3}
    }


def test_whole_file_is_checked_unknown_and_missing_sections_named(tmp_path):
    from qualiclip.pipeline.params import read_params

    shipped = (ROOT / "params.yaml").read_text()
    path = write(tmp_path, shipped.replace("\ntrain:", "\ntrian:"))
    with pytest.raises(ConfigError, match=r"params.yaml: unknown section 'trian' — did you mean 'train'\?"):
        read_params(path)
    path = write(tmp_path, "model: {}\nevaluate: {}\n")
    with pytest.raises(
        ConfigError, match=r"params.yaml has no 'train:' section — add it \('train: \{\}' takes every default\)"
    ):
        read_params(path, "train", "model")
    path = write(tmp_path, "model: {}\nevaluate: {device: banana}\n")
    with pytest.raises(ConfigError, match="evaluate.device must be auto, cpu, cuda, cuda:N or mps, got 'banana'"):
        read_params(path, "model")  # a section present is checked even when the caller does not read it
    configs = read_params(write(tmp_path, "train:\nmodel: {}\n"), "train", "model")  # a bare header: every default
    assert configs["train"] == TrainConfig() and set(configs) == {"train", "model"}


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("train", {"steps": 0}, "train.steps must be an integer in [1, 1000000000], got 0"),
        ("train", {"steps": -5}, "train.steps must be an integer in [1, 1000000000], got -5"),
        ("train", {"warmup_steps": -1}, "train.warmup_steps must be an integer in [0, 1000000000], got -1"),
        ("train", {"checkpoint_every": -1}, "train.checkpoint_every must be an integer in [0, 1000000000], got -1"),
        ("train", {"batch_size": 0}, "train.batch_size must be an integer in [1, 65536], got 0"),
        ("train", {"lr": -0.001}, "train.lr must be a number in (0, 10], got -0.001"),
        ("train", {"lr": float("nan")}, "train.lr must be a finite number, got nan"),
        ("train", {"num_workers": -1}, "train.num_workers must be an integer in [0, 256], got -1"),
        ("train", {"log_every": 0}, "train.log_every must be an integer in [1, 1000000000], got 0"),
        ("train", {"device": "banana"}, "train.device must be auto, cpu, cuda, cuda:N or mps, got 'banana'"),
        ("train", {"lambda_neg": -1}, "train.lambda_neg must be a number in [0, 1000], got -1.0"),
        ("train", {"precision": "fp64"}, "train.precision must be one of 'auto', 'fp32', 'bf16', 'fp16', got 'fp64'"),
        ("degrade", {"crop": 0}, "degrade.crop must be an integer in [1, 16384], got 0"),
        (
            "degrade",
            {"distortions": ["jpeg", "gausian_blur"]},
            "degrade.distortions[1]: unknown distortion 'gausian_blur' — did you mean 'gaussian_blur'?",
        ),
        ("evaluate", {"batch_size": 0}, "evaluate.batch_size must be an integer in [1, 65536], got 0"),
        ("evaluate", {"device": "cuda:x"}, "evaluate.device must be auto, cpu, cuda, cuda:N or mps, got 'cuda:x'"),
        ("ingest", {"background": [0, 0, 256]}, "ingest.background[2] must be an integer in [0, 255], got 256"),
        ("ingest", {"background": [0, 0]}, "ingest.background must have exactly 3 items, got (0, 0)"),
        ("model", {"seed": -1}, "model.seed must be an integer in [0, 4294967295], got -1"),
        (
            "schedule",
            {"timezone": "Europe"},
            "schedule.timezone must be an IANA time zone, e.g. UTC or Europe/Rome, got 'Europe'",
        ),
    ],
)
def test_values_outside_their_declared_range_are_refused(section, values, message):
    from qualiclip.degrade import DegradeConfig
    from qualiclip.evaluate import EvaluateConfig
    from qualiclip.ingest import IngestConfig
    from qualiclip.model import ModelConfig
    from qualiclip.pipeline.params import ScheduleConfig

    configs = {
        "train": TrainConfig,
        "degrade": DegradeConfig,
        "evaluate": EvaluateConfig,
        "ingest": IngestConfig,
        "model": ModelConfig,
        "schedule": ScheduleConfig,
    }
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        build_config(configs[section], values, where=section)


@pytest.mark.parametrize("command", ["serve", "deploy"])
def test_a_bad_cron_string_stops_the_deployment_with_one_line_before_any_server_call(tmp_path, capsys, command):
    from flows.retrain import main

    (tmp_path / "params.yaml").write_text("schedule:\n  cron: '61 * * * *'\n")
    with pytest.raises(SystemExit) as stop:
        main([command, "--project", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert "schedule.cron '61 * * * *' is no cron expression" in err and "e.g. '0 3 * * *'" in err


def test_configs_built_in_python_are_checked_too():
    """The ranges sit on the dataclasses: a benchmark or a library user gets the same errors."""
    from qualiclip.evaluate import EvaluateConfig

    with pytest.raises(ConfigError, match=r"train.steps must be an integer in \[1, 1000000000\], got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match=r"evaluate.precision must be one of 'fp32', 'bf16', 'fp16', got 'fp64'"):
        EvaluateConfig(precision="fp64")
    with pytest.raises(ConfigError, match=r"train.ema must be a number in \[0, 1\), got 1.0 \(0: off; e.g. 0.999\)"):
        dataclasses.replace(TrainConfig(), ema=1.0)


def test_a_section_given_as_a_list_or_a_scalar_is_named():
    with pytest.raises(
        ConfigError,
        match=r"params section 'train' must be a mapping of keys \('key: value' lines\), "
        r"got a list \['steps', 3\]",
    ):
        build_config(TrainConfig, ["steps", 3], where="train")
    with pytest.raises(ConfigError, match="got a string 'steps=3'"):
        build_config(TrainConfig, "steps=3", where="train")


def test_every_number_in_every_section_declares_its_range():
    """A new int or float key needs its allowed values beside it (or a reason to have none here)."""
    from qualiclip.pipeline.params import sections

    unbounded = {"PromotionConfig.min_improvement"}  # any margin, also a negative one, is a choice
    for cls in sections().values():
        for owner, name, hint in _number_fields(cls):
            metadata = getattr(hint, "__metadata__", ())
            assert metadata or f"{owner}.{name}" in unbounded, f"{owner}.{name} declares no range"


def _number_fields(cls: type):
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        if dataclasses.is_dataclass(base):
            yield from _number_fields(base)
        elif base in (int, float):
            yield cls.__name__, f.name, hint


def test_encoding_choices_are_the_shard_encodings():
    from qualiclip.degrade import DegradeConfig
    from qualiclip.shards import ENCODINGS

    assert typing.get_args(typing.get_type_hints(DegradeConfig)["encoding"]) == ENCODINGS


# ---------------------------------------------------------------------------------------------
# Hostile params, round 3 (issue 26): look-alike names, upper bounds, path strings


def test_a_look_alike_name_says_which_character_is_not_what_it_seems(tmp_path):
    from qualiclip.pipeline.params import read_params
    from qualiclip.schema import SampleConfig

    shipped = (ROOT / "params.yaml").read_text()
    with pytest.raises(
        ConfigError,
        match="unknown section 'tr\u0430in' \\('\u0430' at position 3 is U\\+0430 CYRILLIC "
        "SMALL LETTER A, not ASCII\\) — did you mean 'train'\\?",
    ):
        read_params(write(tmp_path, shipped.replace("\ntrain:", "\ntr\u0430in:")))
    with pytest.raises(
        ConfigError, match=r"unknown key 'steps\\u200b' .*U\+200B ZERO WIDTH SPACE.* did you mean 'steps'"
    ):
        build_config(TrainConfig, {"steps\u200b": 3}, where="train")
    with pytest.raises(ConfigError, match="unknown distortion 'jp\u0435g' .*U\\+0435 CYRILLIC SMALL LETTER IE.*'jpeg'"):
        build_config(SampleConfig, {"distortions": ["jp\u0435g"]}, where="degrade")
    with pytest.raises(ConfigError, match=r"unknown key 'stpes' in params section 'train' — did you mean"):
        build_config(TrainConfig, {"stpes": 3}, where="train")  # plain ASCII: no note, the repr shows it


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("degrade", "variants", 10**12),
        ("degrade", "samples_per_shard", 10**9),
        ("degrade", "workers", 10**6),
        ("degrade", "crop", 10**7),
        ("degrade", "max_distortions", 25),
        ("train", "batch_size", 10**9),
        ("train", "steps", 10**12),
        ("train", "shuffle_buffer", 10**9),
        ("train", "num_workers", 10**4),
        ("train", "threads", 10**5),
        ("train", "lr", 1e9),
        ("train", "margin_rank", 2.5),
        ("train", "lambda_pos", 1e9),
        ("train", "grad_clip", 1e300),
        ("train", "checkpoint_every", 10**12),
        ("evaluate", "batch_size", 10**9),
        ("evaluate", "crop", 10**7),
        ("model", "logit_scale", 1e9),
        ("ingest", "max_pixels", 10**15),
        ("ingest", "workers", 10**6),
        ("ingest", "min_size", 10**7),
        ("schedule", "timeout", 1e12),
        ("schedule", "lock_timeout", 1e12),
    ],
)
def test_every_count_and_number_has_an_upper_bound(section, key, value):
    from qualiclip.pipeline.params import sections

    with pytest.raises(ConfigError, match=rf"^{section}\.{key} must be (an integer|a number) in [[(].*, .*[\])], got "):
        build_config(sections()[section], {key: value}, where=section)


def test_every_number_a_params_file_holds_is_bounded_above():
    """No numeric field is left with a lower bound only: a new one must declare its ceiling too."""
    import annotated_types as at

    from qualiclip.pipeline.params import PromotionConfig, sections

    for name, cls in sections().items():
        if cls is PromotionConfig:  # thresholds on a metric of any scale, compared, never allocated
            continue
        for config in (cls, *(h for h in typing.get_type_hints(cls).values() if dataclasses.is_dataclass(h))):
            for field, hint in typing.get_type_hints(config, include_extras=True).items():
                annotated = typing.get_origin(hint) is typing.Annotated
                if (typing.get_args(hint)[0] if annotated else hint) not in (int, float):
                    continue
                metadata = typing.get_args(hint)[1:] if annotated else ()
                flat = [m for g in metadata for m in (g if isinstance(g, at.GroupedMetadata) else [g])]
                assert any(isinstance(m, (at.Le, at.Lt)) for m in flat), f"{name}.{field} has no upper bound"


def test_an_ingest_source_that_cannot_be_a_path_is_one_line():
    from qualiclip.ingest import IngestConfig

    with pytest.raises(ConfigError, match=r"^ingest.sources\[1\]: .*bad_name — the name holds a NUL byte"):
        build_config(IngestConfig, {"sources": ["photos", "ph\x00tos"]}, where="ingest")
