"""The shard format: one WebDataset sample = 2 × L lossless crops + JSON metadata.

Members of a sample ``<image id>_<variant>``: ``c{crop}.l{level}.{png|webp|npy}`` and ``json``.
The JSON holds the sample's provenance (source id, variant, seed, crop boxes, composition,
levels) and a CRC-32 of every crop member, so a damaged member is detected whatever the
encoding (raw ``npy`` has no checksum of its own). Shards are plain tar files with fixed owner,
mode and mtime, so their bytes depend only on their content. See docs/shards.md.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zlib
from pathlib import Path

import cv2
import numpy as np

from .errors import QualiclipError

SHARD_PATTERN = "shard-{:06d}.tar"
INDEX_FILE = "index.json"
FORMAT_VERSION = 2  # bump when the bytes of a sample change for the same inputs and params
ENCODINGS = ("png", "webp", "npy")
PNG_COMPRESSION = 1  # ~3× faster to write than the default 3 for a few % more bytes (docs/shards.md)


class ShardError(QualiclipError, RuntimeError):
    """Missing, incomplete or unreadable shards; the message names the fix."""


# ---------------------------------------------------------------------------------------------
# Writing


def encode_crops(crops: np.ndarray, levels: list[int], encoding: str) -> dict[str, bytes]:
    """uint8 (2, L, H, W, 3) RGB -> {"c0.l1.png": bytes, ...}; lossless for every encoding."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {list(ENCODINGS)}")
    out = {}
    for c in range(crops.shape[0]):
        for li, level in enumerate(levels):
            out[f"c{c}.l{level}.{encoding}"] = encode_image(crops[c, li], encoding)
    return out


def encode_image(rgb: np.ndarray, encoding: str) -> bytes:
    """One uint8 (H, W, 3) RGB image -> lossless bytes."""
    if encoding == "npy":
        bio = io.BytesIO()
        np.save(bio, np.ascontiguousarray(rgb), allow_pickle=False)
        return bio.getvalue()
    flags = [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION] if encoding == "png" else [cv2.IMWRITE_WEBP_QUALITY, 101]
    ok, buf = cv2.imencode(f".{encoding}", np.ascontiguousarray(rgb[..., ::-1]), flags)  # WebP quality > 100: lossless
    if not ok:
        raise ShardError(f"{encoding} encoding failed for an image of shape {rgb.shape}")
    return buf.tobytes()


def sample_json(meta: dict, crops: dict[str, bytes] | None = None) -> bytes:
    """The ``json`` member: ``meta`` plus a CRC-32 per crop member."""
    if crops is not None:
        meta = {**meta, "crc32": {k: zlib.crc32(v) for k, v in crops.items()}}
    return json.dumps(meta, sort_keys=True).encode()


def write_shard(path: Path, samples: list[dict]) -> dict:
    """Write ``samples`` atomically (temp file, fsync, rename); return the index entry.

    The temp name carries the pid: a worker orphaned by a killed run may still finish the shard
    that a rerun is writing, and the two must never share a half-written file.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for s in samples:
                _add_sample(tar, s)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"name": path.name, "samples": len(samples), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _add_sample(tar: tarfile.TarFile, sample: dict) -> None:
    """Members ``<key>.<ext>`` in sorted order with fixed metadata, as `webdataset.TarWriter`
    writes them; plain `tarfile` because importing webdataset imports torch (~2 s per worker)."""
    for ext in sorted(k for k in sample if k != "__key__"):
        data = sample[ext]
        info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uname = info.gname = "qualiclip"
        tar.addfile(info, io.BytesIO(data))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading


def decode_crops(sample: dict) -> np.ndarray:
    """A raw WebDataset sample (bytes per member) -> uint8 (2, L, H, W, 3) in level order.

    Raises `ShardError` when the sample is incomplete (a truncated shard), a member fails its
    CRC, or an image does not decode.
    """
    key = sample.get("__key__", "?")
    if "json" not in sample:
        raise ShardError(f"sample {key} has no json member (truncated shard?)")
    meta = json.loads(sample["json"])
    members = sorted(meta.get("crc32", {}), key=_crop_level)
    if not members:
        raise ShardError(f"sample {key} lists no crops in its json")
    for m in members:
        if m not in sample:
            raise ShardError(f"sample {key} lacks member {m} (truncated shard?)")
        if zlib.crc32(sample[m]) != meta["crc32"][m]:
            raise ShardError(f"sample {key}: member {m} fails its CRC-32 (corrupt shard)")
    crops = [_decode_one(sample[m], f"{key}.{m}") for m in members]
    if len({c.shape for c in crops}) != 1:
        raise ShardError(f"sample {key}: crops of different shapes")
    n_crops = 1 + max(_crop_level(m)[0] for m in members)
    return np.stack(crops).reshape(n_crops, len(members) // n_crops, *crops[0].shape)


def _crop_level(member: str) -> tuple[int, int]:
    c, lvl = member.split(".")[:2]
    return int(c[1:]), int(lvl[1:])


def _decode_one(data: bytes, name: str) -> np.ndarray:
    if name.endswith(".npy"):
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.dtype != np.uint8 or arr.ndim != 3:
            raise ShardError(f"{name}: expected uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
        return arr
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ShardError(f"{name} does not decode")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_index(shard_dir: Path) -> dict:
    """The shard index, or a `ShardError` that says to run the degrade stage."""
    path = Path(shard_dir) / INDEX_FILE
    if not path.is_file():
        raise ShardError(f"no shard index at {path} — run the degrade stage first (`dvc repro degrade`); "
                         "an interrupted run leaves no index until it is rerun to completion")
    index = json.loads(path.read_text())
    missing = [s["name"] for s in index["shards"] if not (Path(shard_dir) / s["name"]).is_file()]
    if missing:
        raise ShardError(f"{len(missing)} shards listed in {path} are missing (e.g. {missing[0]}) — rerun the degrade stage")
    return index


def data_version(shard_dir: Path) -> str:
    """The version of the training data in ``shard_dir``: the first 12 hex digits of the sha256 of
    its index.

    The index holds every shard's sha256, the degrade config and the sample plan, so equal
    versions mean byte-identical training data. This is the one meaning of ``data_version``
    (checkpoint metadata, MLflow run and registry tags); DVC's own hash of the folder is
    recorded apart as ``dvc_shards_md5`` (docs/operations.md).
    """
    read_index(shard_dir)  # the fix ("run the degrade stage first") before a bare FileNotFoundError
    return sha256_file(Path(shard_dir) / INDEX_FILE)[:12]


def shard_paths(shard_dir: Path) -> list[str]:
    """Paths of every indexed shard, in index order."""
    return [str(Path(shard_dir) / s["name"]) for s in indexed_shards(shard_dir)]


def indexed_shards(shard_dir: Path) -> list[dict]:
    """Index entries (name, samples, bytes, sha256) of every shard; an empty index is an error."""
    index = read_index(shard_dir)
    if not index["shards"]:
        raise ShardError(f"the index in {shard_dir} lists no shards — the degrade stage produced no samples")
    return index["shards"]


def verify_shards(shard_dir: Path) -> list[str]:
    """Names of indexed shards whose size or sha256 differs from the index (empty: all intact)."""
    bad = []
    for s in indexed_shards(shard_dir):
        path = Path(shard_dir) / s["name"]
        if path.stat().st_size != s["bytes"] or sha256_file(path) != s["sha256"]:
            bad.append(s["name"])
    return bad
