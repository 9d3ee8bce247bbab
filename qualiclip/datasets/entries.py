"""The ``evaluate.datasets`` entries of params.yaml, read and checked beside the readers they name.

Here, not in the evaluation code, so that a stage can check the entries before its work without
loading the evaluation code: the train stage fails in seconds on a broken entry instead of after
training, and an edit to the evaluation code does not make DVC retrain (dvc.yaml's deps are the
code a stage loads).
"""

from __future__ import annotations

import re

from qualiclip.datasets.base import DatasetError, IQADataset
from qualiclip.datasets.registry import load_dataset
from qualiclip.schema import EvaluateConfig

# The evaluation's own blocks in metrics.json: a dataset label becomes a block and a file name too.
RESERVED_LABELS = ("synthetic", "baseline", "n_synthetic")
EXAMPLE = "{name: clive, root: /data/ChallengeDB_release}"


def load_dataset_spec(spec: dict) -> tuple[str, IQADataset]:
    """(label, dataset) from ``{name, root, [label], **loader options}`` (one ``evaluate.datasets`` entry)."""
    if not isinstance(spec, dict):
        raise DatasetError(f"evaluate.datasets entry {spec!r} is not a mapping — write e.g. {EXAMPLE}")
    spec = dict(spec)
    missing = [k for k in ("name", "root") if k not in spec]
    if missing:
        raise DatasetError(f"evaluate.datasets entry {spec} lacks {missing} — write e.g. {EXAMPLE}")
    label = spec.pop("label", None)
    ds = load_dataset(spec.pop("name"), spec.pop("root"), **spec)
    label = str(label or ds.name)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", label) or label in RESERVED_LABELS:
        raise DatasetError(
            f"dataset label {label!r} cannot name a metrics block and a file — use letters, "
            f"digits, '_', '.', '-', and none of {RESERVED_LABELS} (set `label:` in the entry)"
        )
    return label, ds


def check_datasets(cfg: EvaluateConfig) -> list[tuple[str, IQADataset]]:
    """Read and check every ``evaluate.datasets`` entry: its root, label file and layout, every
    label against its image and every image in a rated folder against a label, and distinct
    labels. Cheap (image headers parsed, no pixel decoded), so stages run it before their work: the
    train stage fails in seconds, not after training. A `DatasetError` names the entry and the fix."""
    loaded: list[tuple[str, IQADataset]] = []
    for spec in cfg.datasets:
        label, ds = load_dataset_spec(spec)
        if any(seen == label for seen, _ in loaded):
            raise DatasetError(f"two evaluate.datasets entries are called '{label}' — give one a `label:`")
        loaded.append((label, ds))
    return loaded
