"""The training loader: exactly-once passes, shuffling, node/worker splits, corrupt and truncated shards."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from qualiclip.degrade import DegradeConfig, run_degrade
from qualiclip.loader import LoaderStats, iterate_batches
from qualiclip.sampling import SampleConfig
from qualiclip.shards import ShardError, decode_crops

CFG = DegradeConfig(
    variants=3, samples_per_shard=2, workers=1, sample=SampleConfig(crop=32, distortions=("gaussian_blur", "jpeg"))
)


@pytest.fixture(scope="module")
def shards(ingest_dir, tmp_path_factory) -> Path:
    """6 shards of 2 samples."""
    out = tmp_path_factory.mktemp("shards")
    run_degrade(CFG, ingest_dir, out, progress=False)
    return out


@pytest.fixture(scope="module")
def two_shards(ingest_dir, tmp_path_factory) -> Path:
    """2 shards (8 + 4 samples): fewer than the workers."""
    out = tmp_path_factory.mktemp("two")
    run_degrade(dataclasses.replace(CFG, samples_per_shard=8), ingest_dir, out, progress=False)
    return out


def reference(shard_dir: Path) -> list[str]:
    """Digests of every sample, read straight from the tars in index order."""
    out = []
    for path in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({n.split(".")[0] for n in members}):
            sample = {"__key__": key, **{n.split(".", 1)[1]: v for n, v in members.items() if n.startswith(key + ".")}}
            out.append(hashlib.sha256(decode_crops(sample).tobytes()).hexdigest())
    return out


def digests(batches) -> list[str]:
    return [hashlib.sha256(s.numpy().tobytes()).hexdigest() for b in batches for s in b]


@pytest.mark.parametrize("workers", [0, 2])
def test_one_pass_yields_every_sample_exactly_once(shards, workers):
    stats = LoaderStats()
    batches = list(iterate_batches(shards, 5, shuffle_buffer=4, num_workers=workers, repeat=False, stats=stats))
    assert [b.shape[0] for b in batches] == [5, 5, 2]
    assert batches[0].shape == (5, 2, 5, 32, 32, 3)
    assert Counter(digests(batches)) == Counter(reference(shards))
    assert (stats.samples, stats.corrupt) == (12, 0)


def test_shuffle_buffer_is_seeded(shards):
    def order(**kw):
        return digests(iterate_batches(shards, 4, repeat=False, **kw))

    assert order(shuffle_buffer=0) == reference(shards)
    a = order(shuffle_buffer=8, seed=0)
    assert a == order(shuffle_buffer=8, seed=0) and sorted(a) == sorted(reference(shards))
    assert a != reference(shards) and a != order(shuffle_buffer=8, seed=1)


def test_endless_stream_is_deterministic_so_resume_is_islice(shards):
    def first(n, skip=0):
        it = iterate_batches(shards, 3, shuffle_buffer=8, num_workers=2, seed=5, repeat=True)
        return digests(itertools.islice(it, skip, n))

    run = first(10)  # 30 samples: more than one epoch of 12
    assert len(run) == 30 and set(run) == set(reference(shards))
    assert first(10, skip=4) == run[12:]


def test_split_by_node_gives_disjoint_complete_parts(shards, monkeypatch):
    parts = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        parts.append(digests(iterate_batches(shards, 4, shuffle_buffer=4, repeat=False)))
    assert len(parts[0]) == len(parts[1]) == 6
    assert not set(parts[0]) & set(parts[1])
    assert Counter(parts[0] + parts[1]) == Counter(reference(shards))


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker")
def test_fewer_shards_than_workers(two_shards):
    once = digests(iterate_batches(two_shards, 4, num_workers=3, repeat=False))
    assert Counter(once) == Counter(reference(two_shards))
    endless = list(itertools.islice(iterate_batches(two_shards, 4, num_workers=3, repeat=True), 10))
    assert len(endless) == 10 and all(b.shape[0] == 4 for b in endless)


def _damage(src: Path, dst: Path, how: str, *, reindex: bool = True) -> None:
    """Copy the shards and damage shard-000001. ``reindex``: record the damaged file in the index,
    as if it had been written that way (else the loader refuses it before reading a sample)."""
    shutil.copytree(src, dst)
    path = dst / "shard-000001.tar"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    if how.startswith("truncate"):
        # mid: inside the second sample's members; boundary: right after the first sample
        end = members[-3].offset_data + 100 if how == "truncate_mid" else members[len(members) // 2].offset
        path.write_bytes(path.read_bytes()[:end])
    else:
        member = next(m for m in members if m.name.endswith(f".{CFG.encoding}"))
        with open(path, "r+b") as f:  # garble the middle of one crop member, tar structure intact
            f.seek(member.offset_data + member.size // 2)
            f.write(b"\x00garbage\xff" * 4)
    if reindex:
        _reindex(dst)


def _reindex(folder: Path) -> None:
    """Record every shard's current size and sha256 in the index (a set written corrupt)."""
    index = json.loads((folder / "index.json").read_text())
    for s in index["shards"]:
        data = (folder / s["name"]).read_bytes()
        s.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("how", ["crop_member", "truncate_mid", "truncate_boundary"])
def test_corrupt_samples_are_skipped_and_counted(shards, tmp_path, how):
    _damage(shards, tmp_path / "s", how)
    stats = LoaderStats()
    got = digests(iterate_batches(tmp_path / "s", 4, shuffle_buffer=0, num_workers=2, repeat=False, stats=stats))
    assert (stats.samples, stats.corrupt) == (len(got), 1) == (11, 1)
    assert set(got) <= set(reference(shards))  # what comes through is intact
    if how == "truncate_boundary":  # the tar ends cleanly: only the index's count reveals the loss
        assert stats.corrupt_keys == ["shard-000001.tar@1"]


def test_missing_index_names_the_fix(tmp_path):
    with pytest.raises(ShardError, match="run the degrade stage first"):
        next(iterate_batches(tmp_path, 2))


def test_endless_stream_with_no_intact_sample_stops_with_the_fix(shards, tmp_path):
    bad = tmp_path / "s"
    shutil.copytree(shards, bad)
    for path in bad.glob("shard-*.tar"):
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(f".{CFG.encoding}")]
        with open(path, "r+b") as f:  # garble every crop member: no sample survives
            for m in members:
                f.seek(m.offset_data + m.size // 2)
                f.write(b"\x00garbage\xff" * 4)
    _reindex(bad)
    with pytest.raises(ShardError, match="no intact sample left; rerun the degrade stage"):
        next(iterate_batches(bad, 2, num_workers=0, repeat=True))


@pytest.mark.parametrize("how", ["png_member", "truncate_mid"])
def test_a_shard_that_differs_from_its_index_stops_the_loader(shards, tmp_path, how):
    _damage(shards, tmp_path / "s", how, reindex=False)
    with pytest.raises(
        ShardError,
        match=r"shard-000001.tar does not match its index entry .*: replaced, damaged.*rerun the degrade stage",
    ):
        list(iterate_batches(tmp_path / "s", 4, shuffle_buffer=0, num_workers=2, repeat=False))


def test_pieces_cut_short_by_a_corrupt_sample_are_regrouped_into_full_batches(shards, tmp_path):
    _damage(shards, tmp_path / "s", "crop_member")
    stats = LoaderStats()
    it = iterate_batches(tmp_path / "s", 4, shuffle_buffer=0, num_workers=2, repeat=True, stats=stats)
    batches = list(itertools.islice(it, 12))  # 48 samples: about four passes over the 11 intact ones
    assert all(b.shape == (4, 2, 5, 32, 32, 3) for b in batches)
    assert set(digests(batches)) < set(reference(shards))  # intact samples only
    assert stats.corrupt >= 4 and all(k == stats.corrupt_keys[0] for k in stats.corrupt_keys)
