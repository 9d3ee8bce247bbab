"""Dataset registry: each release is a small loader function registered by name."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from qualiclip.datasets.base import DatasetError, IQADataset, Labels, Spec
from qualiclip.datasets.validate import build_items, raise_or_report, warn_out_of_range

Loader = Callable[..., Labels]
_REGISTRY: dict[str, tuple[Loader, Spec | None]] = {}


def register(name: str, spec: Spec | None = None) -> Callable[[Loader], Loader]:
    """Register ``loader(root: Path, **options) -> Labels`` as dataset ``name``.

    ``spec`` is the release's declared scale; None means the loader's own options declare it
    and the returned `Labels` carries it (the generic ``csv`` and ``pyiqa`` layouts).
    """

    def decorate(loader: Loader) -> Loader:
        if name in _REGISTRY:
            raise ValueError(f"dataset '{name}' is registered twice")
        _REGISTRY[name] = (loader, spec)
        return loader

    return decorate


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_REGISTRY)


def dataset_spec(name: str) -> Spec | None:
    """The declared scale of ``name`` (None for layouts whose caller declares it)."""
    return _lookup(name)[1]


def load_dataset(
    name: str, root: str | Path, *, on_missing: Literal["error", "exclude"] = "error", **options
) -> IQADataset:
    """Read dataset ``name`` from its release folder ``root``.

    ``options`` are the loader's keyword options (see docs/datasets.md); an unknown or missing one
    is a DatasetError naming it. Labels and image files are checked both ways (see `validate`):
    with ``on_missing='error'`` any problem raises DatasetError; with ``'exclude'`` bad labels are
    dropped and listed with unlabelled images in ``dataset.report``.
    """
    loader, spec = _lookup(name)
    if on_missing not in ("error", "exclude"):
        raise DatasetError(f"on_missing must be 'error' or 'exclude', got {on_missing!r}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a folder — pass the folder the {name} release unpacks to")
    _check_options(name, loader, options)
    labels = loader(root, **options)
    spec = labels.spec or spec
    assert spec is not None, name  # a loader registered without a spec returns one with its labels
    items, problems = build_items(labels, spec)
    raise_or_report(name, root, problems, on_missing)
    warn_out_of_range(name, items, spec)
    return IQADataset(
        name=name,
        root=root,
        items=tuple(items),
        mos_range=spec.mos_range,
        lower_is_better=spec.lower_is_better,
        resize_short_side=spec.resize_short_side,
        report=tuple(problems),
    )


def _lookup(name: str) -> tuple[Loader, Spec | None]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1, cutoff=0.5)
        hint = f" — did you mean '{close[0]}'?" if close else ""
        raise DatasetError(f"unknown dataset '{name}'{hint} (known: {', '.join(list_datasets())})")
    return _REGISTRY[name]


def _check_options(name: str, loader: Loader, options: dict) -> None:
    params = list(inspect.signature(loader).parameters.values())[1:]  # after root
    known = {p.name for p in params}
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" — did you mean '{close[0]}'?" if close else ""
            accepted = ", ".join(sorted(known)) or "none"
            raise DatasetError(f"dataset '{name}' has no option '{key}'{hint} (options: {accepted})")
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in options]
    if missing:
        raise DatasetError(f"dataset '{name}' needs option(s) {missing} — pass them to load_dataset")
