"""What each stage consumes, as dataset references its tracker records (MLflow dataset inputs).

degrade consumes the ingest manifest's training rows, train the shard index (or, on the fly,
the degrade plan of those rows: `plan_input`), evaluate the
manifest's held-out rows and every evaluation dataset. A reference carries a digest of the
content, so two runs that consumed equal data show equal digests, and the runs that produced and
consumed one version of the data can be found by it:

- the shard index: `qualiclip.shards.data_version`, the same ``data_version`` that the checkpoint
  metadata and the registry record;
- manifest rows and rated datasets: the first 12 hex digits of the sha256 of their rows
  (`rows_digest`); the manifest's rows hold each photo's own sha256.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..identity import data_version, rows_digest
from ..ingest import MANIFEST_FILE, read_manifest
from ..shards import INDEX_FILE, read_index
from ..store import open_store
from ..tracking import DatasetRef

if TYPE_CHECKING:  # the dataset readers are evaluate's: the ingest and degrade stages need not load them
    from ..datasets import IQADataset
    from ..onthefly import SamplePlan


def manifest_input(ingest_dir: Path, split: str) -> DatasetRef:
    """The rows of the ingest manifest in ``split`` (``train``: degrade's input; ``val``: evaluate's)."""
    rows = read_manifest(Path(ingest_dir), split)
    return DatasetRef(
        name=f"ingest-{split}",
        source=str((Path(ingest_dir) / MANIFEST_FILE).resolve()),
        digest=rows_digest(rows),
        rows=tuple(rows),
    )


def shard_input(shard_dir: str | os.PathLike) -> DatasetRef:
    """The shard index (one row per shard: name, samples, bytes, sha256), digest = the data version.
    ``shard_dir`` is a folder or a bucket prefix; the source is then the index's ``s3://`` URL."""
    store = open_store(shard_dir)
    source = str(Path(store.path(INDEX_FILE)).resolve()) if store.local else store.url_of(INDEX_FILE)
    index = read_index(shard_dir)
    return DatasetRef(name="shards", source=source, digest=data_version(index), rows=tuple(index["shards"]))


def plan_input(ingest_dir: Path, plan: SamplePlan) -> DatasetRef:
    """What train consumes with ``train.source: on_the_fly``: the manifest rows the degrade plan
    renders, digest = the plan's (`identity.plan_digest`: params, seed, every image's sha256)."""
    ref = manifest_input(ingest_dir, plan.cfg.split)
    return DatasetRef(name=f"degrade-plan-{plan.cfg.split}", source=ref.source, digest=plan.digest[:12], rows=ref.rows)


def iqa_input(label: str, ds: IQADataset) -> DatasetRef:
    """A rated evaluation dataset: its items (path under the root, MOS, split), MOS as the target."""
    root = Path(ds.root)
    rows = [{"path": str(_relative(item.path, root)), "mos": item.mos, "split": item.split or ""} for item in ds.items]
    return DatasetRef(name=label, source=str(root.resolve()), digest=rows_digest(rows), rows=tuple(rows), targets="mos")


def _relative(path: Path, root: Path) -> Path:
    """``path`` under ``root`` when it is (the digest then survives moving the release), else as is."""
    try:
        return Path(path).relative_to(root)
    except ValueError:
        return Path(path)
