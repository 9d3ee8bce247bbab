"""The pipeline's params file: the sections it may hold, read and checked whole before any work.

Every command that reads params.yaml calls `read_params`: the four stages (``qualiclip ingest``
... as dvc.yaml runs them, and the Prefect flows through them), ``qualiclip promote``, the
scheduled retraining (flows/retrain.py), the degrade flow and the benchmarks. It checks every
section present, not only the caller's (`qualiclip.config.build_sections`), so a broken
``evaluate:`` fails before ``ingest`` or ``train`` spend an hour; an unknown section is refused
with the closest name (``trian:`` -> did you mean 'train'?).

A section the caller reads must be in the file: a missing one is an error, never a silent run
on defaults; ``train: {}`` (or a bare ``train:``) asks for every default explicitly. A section
no caller of this run reads may be absent (a project without a schedule needs no
``schedule:``); it is checked by the command that reads it.

The two operations sections' configs live here, not beside the code that uses them: their
readers (promotion.py, flows/retrain.py) read the params file through this module, so this
module cannot import theirs.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from annotated_types import Interval, MinLen, Predicate, doc

from ..config import build_sections, check_fields, load_params
from ..ingest import IngestConfig
from ..schema import DegradeConfig, EvaluateConfig, ModelConfig, PlusConfig, TrainConfig
from .tracking_config import TrackingConfig

MAX_SECONDS = 30 * 24 * 3600.0  # schedule timeouts: at most 30 days (a daily schedule's run ends long before)


def is_timezone(name: object) -> bool:
    """Whether ``name`` is a time zone this machine's zoneinfo database knows (``UTC``, ``Europe/Rome``)."""
    try:
        zoneinfo.ZoneInfo(str(name))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder such as "Europe"
        return False
    return isinstance(name, str)


@dataclass(frozen=True)
class ScheduleConfig:
    """The ``schedule`` section of params.yaml: the Prefect deployment of flows/retrain.py."""

    cron: Annotated[str, MinLen(1)] = "0 3 * * *"  # every day at 03:00
    timezone: Annotated[str, Predicate(is_timezone), doc("an IANA time zone, e.g. UTC or Europe/Rome")] = "UTC"
    deployment: Annotated[str, MinLen(1)] = "scheduled-retraining"
    lock_timeout: Annotated[float, Interval(ge=0, le=MAX_SECONDS)] = (
        3600.0  # seconds a second trigger waits for the workspace
    )
    timeout: Annotated[float, Interval(gt=0, le=MAX_SECONDS)] = (
        43200.0  # seconds all stages of one run may take together
    )
    push: bool = False  # dvc push the outputs to the default remote after a run
    # the Prefect global concurrency limit the train stage holds a slot of: one training per GPU
    # host at a time ({host}: this machine's name; flows/gpu_slot.py creates it with 1 slot)
    gpu_limit: Annotated[str, MinLen(1)] = "qualiclip-gpu-{host}"

    def __post_init__(self) -> None:
        check_fields(self, "schedule")


@dataclass(frozen=True)
class PromotionConfig:
    """The ``promotion`` section of params.yaml (qualiclip promote)."""

    metric: Annotated[str, MinLen(1)] = "synthetic.srcc"  # dotted key into outputs/eval/metrics.json
    # `qualiclip promote --plus`: the dotted key into the plus stage's metrics file (outputs/plus_eval/metrics.json)
    plus_metric: Annotated[str, MinLen(1)] = "test.srcc"
    higher_is_better: bool = True
    min_improvement: float = 0.0  # the new value must beat the champion's by more than this
    min_value: float | None = 0.0  # the floor (a ceiling when lower is better); None: none
    alias: Annotated[str, MinLen(1)] = "champion"
    # the paired bootstrap over photos: promote only when the lower bound at this confidence clears
    # min_improvement (against the champion) and 0 (against the zero-shot baseline)
    confidence: Annotated[float, Interval(ge=0.5, le=0.9999)] = 0.95
    bootstrap: Annotated[int, Interval(ge=100, le=100_000)] = 2000  # resamples
    seed: Annotated[int, Interval(ge=0, le=2**32 - 1)] = 0  # of the resampling: same inputs, same decision

    def __post_init__(self) -> None:
        check_fields(self, "promotion")


def sections() -> dict[str, type]:
    """Every section a params file may hold, and the config it builds."""
    return {
        "model": ModelConfig,
        "tracking": TrackingConfig,
        "ingest": IngestConfig,
        "degrade": DegradeConfig,
        "train": TrainConfig,
        "evaluate": EvaluateConfig,
        "plus": PlusConfig,
        "schedule": ScheduleConfig,
        "promotion": PromotionConfig,
    }


def read_params(params_file: str | Path, *needs: str) -> dict[str, Any]:
    """The configs of every section of ``params_file``, by section name, all checked.

    `ConfigError` (one line naming the file, the key and the fix) for an unreadable file, an
    unknown section or key, a value outside its declared range, or a section of ``needs`` that
    the file lacks.
    """
    return build_sections(load_params(params_file), sections(), file=params_file, needs=needs)
