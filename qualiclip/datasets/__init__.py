"""Standard IQA datasets read from their official release layouts.

    >>> ds = load_dataset("clive", "/data/ChallengeDB_release")
    >>> ds.paths()[:1], ds.mos()[:1]          # mos: higher is better, on the release's scale
    >>> ds.split("test")                      # official split, where the release has one

Every dataset declares its MOS range and direction; `IQAItem.mos` is flipped within that range
for lower-is-better (DMOS) sets, `IQAItem.raw_mos` keeps the released value. Layouts and
assumptions per dataset: docs/datasets.md.
"""

from qualiclip.datasets import releases as _releases  # noqa: F401  (registers the loaders)
from qualiclip.datasets.base import DatasetError, IQADataset, IQAItem, Spec
from qualiclip.datasets.entries import check_datasets, load_dataset_spec
from qualiclip.datasets.registry import dataset_spec, list_datasets, load_dataset
from qualiclip.datasets.releases import clive_labels

__all__ = [
    "DatasetError",
    "IQADataset",
    "IQAItem",
    "Spec",
    "check_datasets",
    "clive_labels",
    "dataset_spec",
    "list_datasets",
    "load_dataset",
    "load_dataset_spec",
]
