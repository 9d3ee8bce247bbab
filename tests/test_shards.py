"""The shard format: lossless encodings, checked decoding, reproducible tars, the index."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from qualiclip.shards import (
    ENCODINGS,
    ShardError,
    decode_crops,
    encode_crops,
    read_index,
    sample_json,
    shard_paths,
    verify_shards,
    write_shard,
)


def crops(seed: int = 0) -> np.ndarray:
    """uint8 (2, 5, 24, 20, 3): noise (worst case for lossless codecs) + a gradient."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (2, 5, 24, 20, 3), dtype=np.uint8)
    x[:, :, :12] = np.arange(20, dtype=np.uint8)[None, None, None, :, None] * 12
    return x


def sample(encoding: str = "png", seed: int = 0) -> dict:
    members = encode_crops(crops(seed), [1, 2, 3, 4, 5], encoding)
    return {"__key__": f"img{seed}_0000", "json": sample_json({"source_id": "img"}, members), **members}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_encoding_round_trips_exactly(encoding):
    s = sample(encoding)
    assert sorted(k for k in s if k.startswith("c")) == sorted(
        f"c{c}.l{lv}.{encoding}" for c in (0, 1) for lv in range(1, 6)
    )
    assert np.array_equal(decode_crops(s), crops())


def test_damaged_or_incomplete_samples_raise_shard_error():
    s = sample()
    with pytest.raises(ShardError, match="no json"):
        decode_crops({k: v for k, v in s.items() if k != "json"})
    with pytest.raises(ShardError, match="lacks member c1.l5.png"):
        decode_crops({k: v for k, v in s.items() if k != "c1.l5.png"})
    bad = bytearray(s["c0.l3.png"])
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(ShardError, match="c0.l3.png fails its CRC"):
        decode_crops({**s, "c0.l3.png": bytes(bad)})
    # a member whose CRC matches (written damaged) still fails in the decoder
    garbage = {**{k: v for k, v in s.items() if k != "json"}, "c0.l1.png": b"not a png"}
    meta = json.loads(s["json"])
    meta["crc32"]["c0.l1.png"] = zlib.crc32(b"not a png")
    with pytest.raises(ShardError, match="does not decode"):
        decode_crops({**garbage, "json": json.dumps(meta).encode()})


def test_shards_are_reproducible_tars_written_atomically(tmp_path):
    a = write_shard(tmp_path / "shard-000000.tar", [sample(seed=0), sample(seed=1)])
    first = (tmp_path / "shard-000000.tar").read_bytes()
    b = write_shard(tmp_path / "shard-000000.tar", [sample(seed=0), sample(seed=1)])
    assert a == b and (tmp_path / "shard-000000.tar").read_bytes() == first
    assert a["samples"] == 2 and a["bytes"] == len(first) and len(a["sha256"]) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]  # no temp file left


def test_index_errors_name_the_fix_and_verify_finds_damage(tmp_path):
    with pytest.raises(ShardError, match="run the degrade stage first"):
        read_index(tmp_path)
    entry = write_shard(tmp_path / "shard-000000.tar", [sample()])
    (tmp_path / "index.json").write_text(json.dumps({"shards": []}))
    with pytest.raises(ShardError, match="lists no shards"):
        shard_paths(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"shards": [entry, {**entry, "name": "shard-000001.tar"}]}))
    with pytest.raises(ShardError, match="missing.*shard-000001.tar.*rerun the degrade stage"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"shards": [entry]}))
    assert verify_shards(tmp_path) == []
    with open(tmp_path / "shard-000000.tar", "r+b") as f:
        f.seek(700)
        f.write(b"x")
    assert verify_shards(tmp_path) == ["shard-000000.tar"]


def test_a_damaged_index_is_a_clear_error(tmp_path):
    entry = write_shard(tmp_path / "shard-000000.tar", [sample()])
    text = json.dumps({"shards": [entry]})
    (tmp_path / "index.json").write_text(text[: len(text) // 2])  # truncated
    with pytest.raises(ShardError, match="index.json is unreadable or not valid JSON.*rerun the degrade stage"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"shards": [{**entry, "name": "../../etc/passwd"}]}))
    with pytest.raises(ShardError, match="entry 0 .* is malformed"):  # never a path outside the folder
        read_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps([entry]))
    with pytest.raises(ShardError, match="no list of shards"):
        read_index(tmp_path)
