"""Every digest that says "this is the same": one function each, what it covers, what changes it.

Which one answers which question:

====================  =====================================================  ==============================
digest                the same ...                                           recorded as
====================  =====================================================  ==============================
`image_id`            photo pixels (16 hex of `pixel_hash`)                  manifest ``id``, the val split
`photo_digest`        source file bytes (64 hex)                             manifest ``sha256``
`plan_digest`         degrade plan: the samples' bytes before they exist     ``plan.json``, on-the-fly data
`index_digest`        shard set: every shard's name, count, size, sha256     train state ``shards``
`data_version`        the training data (12 hex of `index_digest`)           metadata, MLflow tags, lineage
`dvc_shards_md5`      DVC's hash of the shard folder (read, never computed)  the ``dvc_shards_md5`` tag
`params_hash`         stage configs (12 hex)                                 metadata, MLflow tags, run names
`resume_key`          what decides the weights and the batch stream          train state ``key``
`replica_digest`      a module's weights and buffers (DDP replicas equal)    metadata ``replica_digests``
`rows_digest`         a table's rows, in order (12 hex)                      MLflow dataset inputs
`evaluation_digest`   evaluation items and how they are scored (16 hex)      the promotion cache's folder
====================  =====================================================  ==============================

Not identities, and left beside their data: each shard's own sha256 and the CRC-32s of its
members (`shards.write_shard`, `store.hash_stream`: integrity checks the loader repeats, and the
inputs of `index_digest`), and the name of a bucket prefix's lock file (`degrade.lock_path`).

Every value here is pinned by ``tests/test_identity.py``: a digest that changes makes old train
states, shard folders and registry tags stop matching, so a change must be deliberate.
The module imports only `config` and `schema` (no torch, no shard or store code): the ingest
stage, the degrade stage and its workers load it, and what a stage loads is what it depends on,
so editing this file reruns every stage, as a changed digest should.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .config import config_dict, config_fields
from .schema import DegradeConfig, EvaluateConfig, ModelConfig, TrainConfig

# train params that change neither the weights nor the batch stream (``source``: shards and the
# on-the-fly loader give the same batches; the data digest a train state records tells them apart)
RESUME_IGNORES = frozenset(
    {"resume", "checkpoint_every", "log_every", "threads", "compile", "device", "dist_backend", "source"}
)
# evaluate params that change nothing in how an image is scored
EVALUATION_IGNORES = ("baseline", "batch_size", "device")

# ---------------------------------------------------------------------------------------------
# Photos (ingest)


def pixel_hash(pixels: np.ndarray) -> str:
    """sha256 hex of an RGB array's shape, dtype and bytes: equal pixels <=> equal hash.
    Changed by any pixel; not by the file's format, metadata or name."""
    digest = hashlib.sha256(f"{pixels.shape}|{pixels.dtype}|".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def image_id(pixels: np.ndarray) -> str:
    """A photo's id in the manifest: the first 16 hex digits of `pixel_hash`. Two files of equal
    pixels are one photo (ingest keeps one); the id also decides the split (`ingest.split_of`)."""
    return pixel_hash(pixels)[:16]


def photo_digest(data: bytes) -> str:
    """sha256 hex of a source file's bytes (the manifest's ``sha256``): changed by any byte of the
    file, metadata included. `plan_digest` covers it, so re-encoding a photo replans degrade."""
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Training data (degrade, shards)


def plan_digest(cfg: DegradeConfig, rows: list[dict], format_version: int) -> str:
    """sha256 hex of everything a sample's bytes depend on: the shard format version
    (``format_version``, always `shards.FORMAT_VERSION`: passed in, so that the ingest stage,
    which loads this module, loads no shard code), the degrade config less ``workers`` (it
    changes nothing in the output), and the images (manifest ``id`` and ``sha256``) in plan
    order. Equal digests: equal samples, byte for byte. ``plan.json`` records it, so an
    interrupted run of the same plan resumes; on the fly it is the data digest a train state
    records."""
    key = {k: v for k, v in config_fields(cfg).items() if k != "workers"}
    blob = json.dumps([format_version, key, [(r["id"], r["sha256"]) for r in rows]], sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()


def index_digest(index: dict) -> str:
    """sha256 hex of a shard index's entries (each shard's name, sample count, size and sha256, in
    order): equal digests, equal training data. Not changed by ``plan.json``, the lock file or
    the index's other fields; a train state records it (``shards``) and refuses other shards."""
    blob = json.dumps([[s["name"], s["samples"], s["bytes"], s["sha256"]] for s in index["shards"]])
    return hashlib.sha256(blob.encode()).hexdigest()


def data_version(index: dict) -> str:
    """The version of the training data a shard index lists: the first 12 hex digits of its
    `index_digest` (`shards.data_version` reads it from a folder or a bucket prefix).

    Equal versions mean byte-identical training data. This is the one meaning of
    ``data_version`` (checkpoint metadata, MLflow run and registry tags, the train run's dataset
    input; the train state's ``shards`` is the whole digest); DVC's own hash of the folder is
    recorded apart (`dvc_shards_md5`).
    """
    return index_digest(index)[:12]


def dvc_shards_md5(project_dir: Path, shards: str) -> str | None:
    """The md5 that ``dvc.lock`` records for the shard folder (train's dep, else degrade's out);
    None without ``dvc.lock``.

    DVC computes it, not this project: the md5 of DVC's listing of every file in the folder
    (each one's relative path and md5: the shards, their records, ``index.json``, ``plan.json``),
    so it also changes with files that are not training data, and exists only where ``dvc.lock``
    does. Recorded beside `data_version`, never as it.
    """
    lock = Path(project_dir) / "dvc.lock"
    if not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    entries = stages.get("train", {}).get("deps", []) + stages.get("degrade", {}).get("outs", [])
    for entry in entries:
        if Path(entry.get("path", "")) == Path(shards) and entry.get("md5"):
            return str(entry["md5"]).removesuffix(".dir")
    return None


# ---------------------------------------------------------------------------------------------
# Params and models (train)


def params_hash(*cfgs: Any) -> str:
    """The first 12 hex digits of the sha256 of one or more configs by params key (`config_dict`):
    changed by any value of any of them, ``workers`` and ``device`` included. Names runs and
    model versions (``params_hash`` in the metadata and the registry's tags)."""
    blob = json.dumps([config_dict(c) for c in cfgs], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def resume_params(cfg: TrainConfig, model_cfg: ModelConfig, world_size: int) -> dict[str, object]:
    """Everything that determines the weights and the batch stream, as flat params keys
    (``train.lr``, ``model.name``, ``world_size``); a train state records it.

    Over the params keys (`config_fields`: the loss weights flat, as before `TrainConfig.loss`
    existed), so a train state written by an earlier version resumes.
    """
    train = {k: v for k, v in config_fields(cfg).items() if k not in RESUME_IGNORES}
    if not train["ema"]:  # off: the key of states written before train.ema existed
        del train["ema"]
    model = dataclasses.asdict(model_cfg)
    return {
        **{f"train.{k}": v for k, v in train.items()},
        **{f"model.{k}": v for k, v in model.items()},
        "world_size": world_size,
    }


def resume_key(cfg: TrainConfig, model_cfg: ModelConfig, world_size: int) -> str:
    """16 hex digits over `resume_params` (the blob of earlier versions, so their train states
    still resume): changed by the train and model params that decide the weights and the number
    of processes, not by `RESUME_IGNORES`. A train state of another key is refused."""
    params = resume_params(cfg, model_cfg, world_size)
    train = sorted((k.removeprefix("train."), v) for k, v in params.items() if k.startswith("train."))
    model = sorted((k.removeprefix("model."), v) for k, v in params.items() if k.startswith("model."))
    blob = repr((train, model, world_size))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def replica_digest(state_dict: Mapping[str, Any]) -> str:
    """16 hex digits of the sha256 of every tensor of a state dict (name and bytes, in order):
    equal on all DDP replicas after training; changed by any weight or buffer."""
    h = hashlib.sha256()
    for k, v in state_dict.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Evaluation data (lineage, promotion)


def rows_digest(rows: list[dict]) -> str:
    """A content digest of a table (12 hex): equal rows in equal order, equal digest; key order
    within a row does not count. The manifest's rows and each rated dataset's items."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:12]


def evaluation_digest(eval_dir: Path, cfg: EvaluateConfig) -> str:
    """What the evaluation data is (16 hex): the items of every per-image score file in
    ``eval_dir`` (each row less its ``*score`` columns) and the evaluate settings that decide how
    an image is scored (not `EVALUATION_IGNORES`). Equal digests: the same images, scored the
    same way; the scores themselves do not count."""
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(cfg).items() if k not in EVALUATION_IGNORES}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in sorted(eval_dir.glob("*scores*.csv")):
        h.update(path.name.encode())
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                h.update(json.dumps([v for k, v in row.items() if not k.endswith("score")]).encode())
    return h.hexdigest()[:16]
