"""The dataset types: a rated image, a rated dataset, and what a release loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import QualiclipError


class DatasetError(QualiclipError, ValueError):
    """A dataset that cannot be read as asked: unknown name, bad option, broken layout."""


@dataclass(frozen=True)
class IQAItem:
    """One rated image. ``mos`` is higher-is-better on the dataset's own scale; ``raw_mos`` is the
    label as released (a DMOS for lower-is-better sets). ``split`` is the official split or None."""

    path: Path
    mos: float
    split: str | None = None
    raw_mos: float | None = None

    def __post_init__(self):
        if self.raw_mos is None:
            object.__setattr__(self, "raw_mos", self.mos)


@dataclass(frozen=True)
class IQADataset:
    """A rated image set read from one release.

    ``mos_range`` and ``lower_is_better`` describe the *released* labels; every ``item.mos`` is
    already flipped within ``mos_range`` so that higher is better. ``resize_short_side`` is the
    evaluation resize rule (shorter side to that many pixels, None = full resolution).
    ``report`` lists ``(path, reason)`` for everything excluded with ``on_missing='exclude'``.
    """

    name: str
    root: Path
    items: tuple[IQAItem, ...]
    mos_range: tuple[float, float]
    lower_is_better: bool
    resize_short_side: int | None = None
    report: tuple[tuple[Path, str], ...] = field(default=(), compare=False)

    def __len__(self) -> int:
        return len(self.items)

    def paths(self) -> list[Path]:
        return [item.path for item in self.items]

    def mos(self) -> np.ndarray:
        """Higher-is-better scores, shape (N,), float64."""
        return np.array([item.mos for item in self.items], dtype=float)

    def raw_mos(self) -> np.ndarray:
        return np.array([item.raw_mos for item in self.items], dtype=float)

    @property
    def splits(self) -> tuple[str, ...]:
        """The official split names present, sorted; empty when the release defines none."""
        return tuple(sorted({item.split for item in self.items if item.split is not None}))

    def split(self, name: str) -> IQADataset:
        """The items of split ``name`` (e.g. ``'test'``) as a dataset of the same kind."""
        if name not in self.splits:
            have = f"splits {list(self.splits)}" if self.splits else "no official split"
            raise DatasetError(
                f"dataset '{self.name}' has {have}, not '{name}' — evaluate the whole set or pick one of those"
            )
        return replace(self, items=tuple(i for i in self.items if i.split == name))


@dataclass(frozen=True)
class Spec:
    """What a dataset declares about its labels and evaluation (pyiqa-style)."""

    mos_range: tuple[float, float]
    lower_is_better: bool
    resize_short_side: int | None = None


@dataclass(frozen=True)
class Row:
    """One label as a release lists it: ``name`` is relative to the loader's ``image_dir``."""

    name: str
    raw_mos: float
    split: str | None = None


@dataclass(frozen=True)
class Labels:
    """What a release loader returns.

    ``ignore`` names (relative to ``image_dir``) are files that sit among the rated images but
    are known not to be rated (KADID's references, LIVE's reference copies): they are neither
    reported as unlabelled nor loaded. ``spec`` is set only by loaders whose scale the caller
    declares (``csv``, ``pyiqa``); the others take the registered one.
    """

    rows: list[Row]
    image_dir: Path
    ignore: frozenset[str] = frozenset()
    spec: Spec | None = None
