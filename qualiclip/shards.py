"""The shard format: one WebDataset sample = 2 × L lossless crops + JSON metadata.

Members of a sample ``<image id>_<variant>``: ``c{crop}.l{level}.{png|webp|npy}`` and ``json``.
The JSON holds the sample's provenance (source id, variant, seed, crop boxes, composition,
levels) and a CRC-32 of every crop member, so a damaged member is detected whatever the
encoding (raw ``npy`` has no checksum of its own). Shards are plain tar files with fixed owner,
mode and mtime, so their bytes depend only on their content. The index (``index.json``) lists
each shard's size and sha256 as recorded when it was written; `read_index` checks its form and
`verify_shards` the files against it. See docs/shards.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import zlib

import cv2
import numpy as np
from PIL import Image

from . import identity
from .errors import QualiclipError
from .store import Store, StoreError, open_store, split_location

SHARD_PATTERN = "shard-{:06d}.tar"
INDEX_FILE = "index.json"
# bump when the bytes of a sample change for the same inputs and params
# (3: impulse_noise draws, webp; 4: Gaussian noise fields from a quantile table, docs/distortions.md)
FORMAT_VERSION = 4
ENCODINGS = ("png", "webp", "npy")
PNG_COMPRESSION = 1  # ~1.5× faster to write than the default 3 for 3 % more bytes (docs/shards.md)
WEBP_METHOD = 0  # lossless WebP's fastest effort: 1.5 ms a 224² crop; methods 1–6 save 2–4 % for 3–10× the time
SHARD_NAME = re.compile(r"shard-\d{6}\.tar")  # an index entry names a file in the shard folder, nothing else
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
CROP_MEMBER = re.compile(r"c\d{1,3}\.l\d{1,3}\.(png|webp|npy)")  # c{crop}.l{level}.{encoding}


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
    bio = io.BytesIO()
    if encoding == "npy":
        np.save(bio, np.ascontiguousarray(rgb), allow_pickle=False)
        return bio.getvalue()
    if encoding == "webp":  # Pillow: OpenCV cannot choose the lossless effort (it uses method 4, ~30× slower)
        Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(
            bio, format="WEBP", lossless=True, method=WEBP_METHOD, quality=0
        )
        return bio.getvalue()
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise ShardError(f"{encoding} encoding failed for an image of shape {rgb.shape}")
    return buf.tobytes()


def sample_json(meta: dict, crops: dict[str, bytes] | None = None) -> bytes:
    """The ``json`` member: ``meta`` plus a CRC-32 per crop member."""
    if crops is not None:
        meta = {**meta, "crc32": {k: zlib.crc32(v) for k, v in crops.items()}}
    return json.dumps(meta, sort_keys=True).encode()


def write_shard(location: str | os.PathLike, samples: list[dict]) -> dict:
    """Write ``samples`` as the shard at ``location`` (a path, or a URL such as ``s3://bucket/prefix/
    shard-000000.tar``) atomically (`store.Store.write_bytes`); return its index entry."""
    store, name = split_location(location)
    data = shard_bytes(samples)
    store.write_bytes(name, data)
    return {"name": name, "samples": len(samples), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def shard_bytes(samples: list[dict]) -> bytes:
    """The tar of ``samples``: the same bytes for the same samples (fixed owner, mode, mtime, order)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            _add_sample(tar, s)
    return buf.getvalue()


def _add_sample(tar: tarfile.TarFile, sample: dict) -> None:
    """Members ``<key>.<ext>`` in sorted order with fixed metadata, as `webdataset.TarWriter`
    writes them; plain `tarfile` because importing webdataset imports torch (~2 s per worker)."""
    for ext in sorted(k for k in sample if k != "__key__"):
        data = sample[ext]
        info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uname = info.gname = "qualiclip"
        tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------------
# Reading


def decode_crops(sample: dict) -> np.ndarray:
    """A raw WebDataset sample (bytes per member) -> uint8 (2, L, H, W, 3) in level order.

    Raises `ShardError` when the sample is incomplete (a truncated shard), its json is not the
    one a shard writer writes, a member fails its CRC, or an image does not decode.
    """
    key = sample.get("__key__", "?")
    if "json" not in sample:
        raise ShardError(f"sample {key} has no json member (truncated shard?)")
    crcs = _member_crcs(sample["json"], key)
    members = sorted(crcs, key=_crop_level)
    for m in members:
        if m not in sample:
            raise ShardError(f"sample {key} lacks member {m} (truncated shard?)")
        if zlib.crc32(sample[m]) != crcs[m]:
            raise ShardError(f"sample {key}: member {m} fails its CRC-32 (corrupt shard)")
    crops = [_decode_one(sample[m], f"{key}.{m}") for m in members]
    if len({c.shape for c in crops}) != 1:
        raise ShardError(f"sample {key}: crops of different shapes")
    n_crops = 1 + max(_crop_level(m)[0] for m in members)
    return np.stack(crops).reshape(n_crops, len(members) // n_crops, *crops[0].shape)


def _member_crcs(raw: bytes, key: str) -> dict[str, int]:
    """The ``crc32`` table of a sample's json: crop members forming a full (crop, level) grid."""
    try:
        meta = json.loads(raw)
    except ValueError:
        raise ShardError(f"sample {key}: its json member is not JSON (corrupt shard)") from None
    crcs = meta.get("crc32") if isinstance(meta, dict) else None
    if not isinstance(crcs, dict) or not crcs:
        raise ShardError(f"sample {key} lists no crops in its json")
    if not all(CROP_MEMBER.fullmatch(m) and isinstance(v, int) for m, v in crcs.items()):
        raise ShardError(f"sample {key}: its json lists malformed crop members (corrupt shard)")
    grid = {_crop_level(m) for m in crcs}
    levels = sorted({lvl for _, lvl in grid})
    n_crops = 1 + max(c for c, _ in grid)
    if len(grid) != len(crcs) or grid != {(c, lvl) for c in range(n_crops) for lvl in levels}:
        raise ShardError(f"sample {key}: its crops do not form a (crop, level) grid (corrupt shard)")
    return crcs


def _crop_level(member: str) -> tuple[int, int]:
    c, lvl = member.split(".")[:2]
    return int(c[1:]), int(lvl[1:])


def _decode_one(data: bytes, name: str) -> np.ndarray:
    if name.endswith(".npy"):
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ShardError(f"{name} does not decode ({exc})") from None
        if arr.dtype != np.uint8 or arr.ndim != 3:
            raise ShardError(f"{name}: expected uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
        return arr
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ShardError(f"{name} does not decode")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_index(shard_dir: str | os.PathLike) -> dict:
    """The shard index of a folder or bucket prefix, or a `ShardError` that says to run the degrade stage.

    The index must be a JSON object whose ``shards`` entries each have a plain shard file
    ``name`` (no path: it is opened inside ``shard_dir``), a ``samples`` and ``bytes`` count
    and a ``sha256``; every listed file must exist.
    """
    store = open_store(shard_dir)
    path = store.url_of(INDEX_FILE)
    try:
        index = json.loads(store.read_bytes(INDEX_FILE))
    except FileNotFoundError:
        raise ShardError(
            f"no shard index at {path} — run the degrade stage first (`dvc repro degrade`); "
            "an interrupted run leaves no index until it is rerun to completion"
        ) from None
    except StoreError:
        raise  # the bucket cannot be reached: its own message names the fix
    except (OSError, ValueError) as exc:
        raise ShardError(
            f"the shard index {path} is unreadable or not valid JSON ({type(exc).__name__}: {exc}) "
            "— it is damaged (truncated?); rerun the degrade stage to rewrite it"
        ) from None
    _check_index(path, index)
    files = store.entries()
    missing = [s["name"] for s in index["shards"] if files.get(s["name"]) is None]
    if missing:
        raise ShardError(
            f"{len(missing)} shards listed in {path} are missing (e.g. {missing[0]}) — rerun the degrade stage"
        )
    return index


def _check_index(path: str, index) -> None:
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list):
        raise ShardError(f"the shard index {path} has no list of shards — it is damaged; rerun the degrade stage")
    for k, s in enumerate(shards):
        ok = (
            isinstance(s, dict)
            and isinstance(s.get("name"), str)
            and SHARD_NAME.fullmatch(s["name"])
            and all(
                isinstance(s.get(n), int) and not isinstance(s.get(n), bool) and s[n] >= 0 for n in ("samples", "bytes")
            )
            and isinstance(s.get("sha256"), str)
            and SHA256_HEX.fullmatch(s["sha256"])
        )
        if not ok:
            raise ShardError(
                f"entry {k} of the shard index {path} is malformed ({s!r:.200}) — the index is damaged; "
                "rerun the degrade stage"
            )


def data_version(shard_dir: str | os.PathLike) -> str:
    """`identity.data_version` of the index in ``shard_dir`` (a folder or a bucket prefix)."""
    return identity.data_version(read_index(shard_dir))


def shard_paths(shard_dir: str | os.PathLike) -> list[str]:
    """Locations of every indexed shard, in index order: paths on disk, URLs in a bucket (`store.open_file`)."""
    store = open_store(shard_dir)
    return [store.url_of(s["name"]) for s in indexed_shards(shard_dir)]


def indexed_shards(shard_dir: str | os.PathLike) -> list[dict]:
    """Index entries (name, samples, bytes, sha256) of every shard; an empty index is an error."""
    index = read_index(shard_dir)
    if not index["shards"]:
        raise ShardError(f"the index in {shard_dir} lists no shards — the degrade stage produced no samples")
    return index["shards"]


def entry_problem(size: int, sha256: str | None, entry: dict) -> str | None:
    """Why bytes of ``size`` (and ``sha256``, None: unchecked) are not the shard ``entry`` records, or None."""
    if size != entry["bytes"]:
        return f"is {size} bytes, recorded {entry['bytes']}"
    if sha256 is not None and sha256 != entry["sha256"]:
        return "differs from its recorded sha256"
    return None


def shard_problem(store: Store, name: str, entry: dict, size: int | None, *, check_hash: bool = True) -> str | None:
    """Why the shard file ``name`` is not the one ``entry`` records, or None.

    ``size`` is the file's size in a listing (`Store.entries`; None: absent), checked first: one
    listing serves every shard, where a bucket would answer one request per shard. The sha256
    check reads the file once.
    """
    if size is None:
        return "is missing"
    if (problem := entry_problem(size, None, entry)) or not check_hash:
        return problem
    try:
        return entry_problem(*store.sha256(name), entry)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"


def verify_shards(shard_dir: str | os.PathLike, names: list[str] | None = None) -> list[str]:
    """Names of indexed shards whose size or sha256 differs from the index (empty: all intact).

    Sizes are checked for every shard (one listing), hashes for those in ``names`` (None: all).
    """
    store = open_store(shard_dir)
    files = store.entries()
    return [
        s["name"]
        for s in indexed_shards(shard_dir)
        if shard_problem(store, s["name"], s, files.get(s["name"]), check_hash=names is None or s["name"] in names)
    ]
