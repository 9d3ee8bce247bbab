"""Fuzzing every reader of untrusted bytes: whatever the bytes, a result or the reader's own error.

Inputs are valid files (images of each format, a shard, its index, a checkpoint's weights and
config, a pyiqa split file, params.yaml) with random bytes overwritten, cut or inserted, plus
plain random bytes; params files are also edited as YAML (any value at any key). Strings that
become paths (a `qualiclip score` list file, the ``path`` rows of a served request) and the text of
numeric CLI options are fuzzed too. No input may hang, crash with another exception, or run code. Bounded for CI:
`derandomize` makes the examples the same on every run and `max_examples`/`deadline` keep the
whole file to a few seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imagefiles import encode, noise
from PIL import Image

from qualiclip.checkpoint import read_config
from qualiclip.datasets import DatasetError
from qualiclip.datasets.readers import read_split_file
from qualiclip.imageio import READ_REASONS, ImageReadError, decode_image, read_image
from qualiclip.loader import decode_sample, expand_shards
from qualiclip.model import ModelLoadError, read_safetensors_header
from qualiclip.pipeline.serving import (  # mlflow: seconds, imported before the deadline counts
    SERVE_ROOT_ENV,
    resolve_paths,
)
from qualiclip.shards import ShardError, encode_crops, read_index, sample_json, write_shard

# QUALICLIP_FUZZ_EXAMPLES=20000 fuzzes deeper, with new random examples each run (not for CI)
EXAMPLES = int(os.environ.get("QUALICLIP_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=2000,
    derandomize="QUALICLIP_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
MAX_PIXELS = 1 << 20  # a mutated header may declare anything; the guard must hold


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """One of ``seeds`` with up to 6 random byte overwrites, cuts and insertions, or random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=2048))
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(("set", "set", "cut", "insert")))
        if op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i:]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def _images() -> list[bytes]:
    rgb = Image.fromarray(noise(0, 16, 12))
    return [
        encode(rgb, "PNG"),
        encode(rgb, "JPEG"),
        encode(rgb, "WEBP", lossless=True),
        encode(rgb, "TIFF"),
        encode(rgb, "BMP"),
        encode(rgb.convert("P"), "GIF"),
        encode(rgb.convert("RGBA"), "PNG"),
        encode(Image.fromarray(noise(1, 16, 12, 1).astype(np.uint16) * 257), "PNG"),
    ]


IMAGES = _images()


@FUZZ
@given(mutated(IMAGES))
def test_decoding_image_bytes_gives_rgb_or_an_image_read_error(data):
    try:
        img = decode_image(data, max_pixels=MAX_PIXELS)
    except ImageReadError as exc:
        assert exc.reason in ("zero_bytes", "not_an_image", "truncated", "too_large", "unsupported_mode", "unreadable")
        return
    assert img.pixels.dtype == np.uint8 and img.pixels.ndim == 3 and img.pixels.shape[2] == 3
    assert img.width * img.height <= MAX_PIXELS


def read_file(tmp_path_factory, name: str, data: bytes, read, error: type[Exception]):
    """``read(path)`` of a fresh file ``name`` holding ``data``, or None when it raises ``error``."""
    path = tmp_path_factory.mktemp("fuzz") / name
    path.write_bytes(data)
    try:
        return read(path)
    except error:
        return None


@FUZZ
@given(mutated(IMAGES))
def test_reading_an_image_file_gives_rgb_or_an_image_read_error(tmp_path_factory, data):
    img = read_file(tmp_path_factory, "x.jpg", data, lambda p: read_image(p, max_pixels=MAX_PIXELS), ImageReadError)
    assert img is None or img.pixels.ndim == 3


# ---------------------------------------------------------------------------------------------
# Shards and their index


def _shard_bytes() -> tuple[bytes, bytes]:
    """A shard of two samples (PNG and npy crops, 2 crops x 2 levels) and its index."""
    crops = np.stack([np.stack([noise(10 * c + lv, 8, 8) for lv in range(2)]) for c in range(2)])
    samples = []
    for k, encoding in enumerate(("png", "npy")):
        members = encode_crops(crops, [1, 2], encoding)
        samples.append({"__key__": f"img_{k:04d}", "json": sample_json({"source_id": "img"}, members), **members})
    with tempfile.TemporaryDirectory() as tmp:
        entry = write_shard(Path(tmp) / "shard-000000.tar", samples)
        shard = (Path(tmp) / "shard-000000.tar").read_bytes()
    return shard, json.dumps({"shards": [entry], "total_samples": 2}).encode()


SHARD, INDEX = _shard_bytes()


@FUZZ
@given(mutated([SHARD]))
def test_the_loader_turns_any_shard_bytes_into_samples_or_error_markers(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("shard") / "shard-000000.tar"
    path.write_bytes(data)
    for raw in expand_shards(iter([{"url": str(path), "samples": 2}])):
        out = decode_sample(raw)
        assert ("crops" in out) != ("error" in out)
        if "crops" in out:
            assert out["crops"].dtype == np.uint8 and out["crops"].ndim == 5


@FUZZ
@given(mutated([INDEX, json.dumps({"shards": []}).encode()]))
def test_reading_an_index_gives_a_checked_index_or_a_shard_error(tmp_path_factory, data):
    def read(path: Path) -> tuple[Path, dict]:
        (path.parent / "shard-000000.tar").write_bytes(SHARD)
        return path.parent, read_index(path.parent)

    if (got := read_file(tmp_path_factory, "index.json", data, read, ShardError)) is not None:
        folder, index = got
        assert all((folder / s["name"]).resolve().parent == folder.resolve() for s in index["shards"])


# ---------------------------------------------------------------------------------------------
# Checkpoints and split files


def _checkpoint_seeds() -> tuple[bytes, bytes]:
    import torch
    from safetensors.torch import save

    weights = save({"clip.visual.w": torch.ones(2, 3), "prompt_features": torch.zeros(2, 4, dtype=torch.float16)})
    config = json.dumps(
        {
            "model": {"name": "qualiclip-tiny-rn", "pretrained": None, "logit_scale": 100.0},
            "open_clip_config": {"embed_dim": 64, "vision_cfg": {"width": 16, "layers": [1, 1, 1, 1]}},
        }
    )
    return weights, config.encode()


WEIGHTS, CONFIG = _checkpoint_seeds()


@FUZZ
@given(mutated([WEIGHTS]))
def test_a_safetensors_header_is_checked_or_refused(tmp_path_factory, data):
    header = read_file(tmp_path_factory, "model.safetensors", data, read_safetensors_header, ModelLoadError)
    for entry in header.tensors.values() if header else ():  # offsets a reader may trust: inside the file
        assert header.data_start + entry["data_offsets"][1] <= len(data)


@FUZZ
@given(mutated([CONFIG]))
def test_a_checkpoint_config_is_read_or_refused(tmp_path_factory, data):
    got = read_file(tmp_path_factory, "config.json", data, lambda p: read_config(p.parent), ModelLoadError)
    assert got is None or (isinstance(got[0].name, str) and (got[1] is None or isinstance(got[1], dict)))


SPLIT = pickle.dumps({1: {"train": [0, 2], "val": [], "test": [1]}})


@FUZZ
@given(mutated([SPLIT, pickle.dumps({1: {"train": list(range(5))}}, protocol=0)]))
def test_a_split_file_is_read_as_plain_data_or_refused(tmp_path_factory, data):
    scheme = read_file(tmp_path_factory, "split.pkl", data, lambda p: read_split_file(p, 1), DatasetError)
    assert scheme is None or all(isinstance(r, int) for rows in scheme.values() for r in rows)


# ---------------------------------------------------------------------------------------------
# Params files (issue 19): whatever the file holds, its configs or one line naming the file


PARAMS = (Path(__file__).resolve().parents[1] / "params.yaml").read_bytes()
PARAMS_DICT = yaml.safe_load(PARAMS)
PARAMS_ALIAS = b"train: {steps: &n 3, log_every: *n}\nmodel: &m {seed: 1}\n"  # anchors, an alias of one value
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.integers()
    | st.floats()
    | st.sampled_from(["auto", "cuda:1", "banana", "jpeg", "", "train", "val", "fp16"])
    | st.text(max_size=12)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4),
    max_leaves=10,
)


@st.composite
def edited_params(draw) -> bytes:
    """The shipped params.yaml with up to 5 edits: a value set (mostly of a known key), a key or a
    section dropped, renamed or added, or a whole section replaced by any YAML value."""
    params = copy.deepcopy(PARAMS_DICT)
    for _ in range(draw(st.integers(1, 5))):
        name = draw(st.sampled_from([*params, "trian", "extra"]))
        section = params.get(name)
        op = draw(st.sampled_from(("set", "set", "set", "drop", "rename", "section")))
        if op == "section" or not isinstance(section, dict):
            params[name] = draw(VALUES)
        elif op == "drop" and section:
            section.pop(draw(st.sampled_from(list(section))))
        elif op == "rename":
            params[draw(st.text(min_size=1, max_size=8))] = params.pop(name)
        else:
            key = draw(st.sampled_from(list(section)) | st.text(max_size=8)) if section else draw(st.text(max_size=8))
            section[key] = draw(VALUES)
    return yaml.safe_dump(params, allow_unicode=draw(st.booleans())).encode()


def read_params_or_refuse(tmp_path_factory, data: bytes) -> dict | None:
    """The configs of a params file holding ``data``, or None when it is refused by a `ConfigError`
    of one line that names the file; any other exception fails the test."""
    from qualiclip.config import ConfigError
    from qualiclip.pipeline.params import read_params

    path = tmp_path_factory.getbasetemp() / "fuzz-params.yaml"  # one file, rewritten: no folder per example
    path.write_bytes(data)
    try:
        return read_params(path)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(path)), str(exc)
        return None


@settings(FUZZ, max_examples=EXAMPLES // 2)  # each example parses YAML twice (~10 ms in pure Python)
@given(edited_params())
def test_an_edited_params_file_gives_configs_or_one_line(tmp_path_factory, data):
    configs = read_params_or_refuse(tmp_path_factory, data)
    assert configs is None or all(dataclasses.is_dataclass(c) for c in configs.values())


@FUZZ
@given(mutated([PARAMS, PARAMS_ALIAS]))
def test_params_file_bytes_give_configs_or_one_line(tmp_path_factory, data):
    configs = read_params_or_refuse(tmp_path_factory, data)
    assert configs is None or all(dataclasses.is_dataclass(c) for c in configs.values())


def test_seed_files_are_valid(tmp_path):
    """The fuzzers start from valid files, so mutations reach deep into each reader."""
    for data in IMAGES:
        assert decode_image(data).pixels.shape == (12, 16, 3)
    (tmp_path / "shard-000000.tar").write_bytes(SHARD)
    (tmp_path / "index.json").write_bytes(INDEX)
    assert read_index(tmp_path)["shards"][0]["samples"] == 2
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert len(tar.getnames()) == 2 * (1 + 4)
    (tmp_path / "model.safetensors").write_bytes(WEIGHTS)
    assert set(read_safetensors_header(tmp_path / "model.safetensors").tensors) == {"clip.visual.w", "prompt_features"}
    (tmp_path / "config.json").write_bytes(CONFIG)
    assert read_config(tmp_path)[0].name == "qualiclip-tiny-rn"
    (tmp_path / "split.pkl").write_bytes(SPLIT)
    assert read_split_file(tmp_path / "split.pkl", 1) == {"train": [0, 2], "val": [], "test": [1]}
    from qualiclip.pipeline.params import read_params, sections

    (tmp_path / "params.yaml").write_bytes(PARAMS)
    assert set(read_params(tmp_path / "params.yaml")) == set(sections())
    (tmp_path / "params.yaml").write_bytes(PARAMS_ALIAS)
    assert read_params(tmp_path / "params.yaml")["model"].seed == 1


# ---------------------------------------------------------------------------------------------
# Strings that become paths and numbers a user types (issue 26): a per-item error, or a usage
# error naming the option; never an exception from deeper down


LIST_SEED = b"# photos\ngood.png\nsub/x.jpg\n\n/abs/y.webp\nbad\x00name.png\ncaf\xe9.png\n" + b"z" * 300 + b".png\n"


@FUZZ
@given(mutated([LIST_SEED]))
def test_every_list_file_entry_is_read_or_gets_its_own_image_read_error(tmp_path_factory, data):
    from qualiclip.pipeline.score_cli import read_list_file

    folder = tmp_path_factory.getbasetemp() / "fuzz-list"
    folder.mkdir(exist_ok=True)
    (folder / "good.png").write_bytes(IMAGES[0])
    (folder / "list.txt").write_bytes(data)
    for entry in read_list_file(folder / "list.txt"):
        try:
            assert read_image(entry, max_pixels=MAX_PIXELS).pixels.ndim == 3
        except ImageReadError as exc:
            assert exc.reason in READ_REASONS


ROW_VALUES = (
    st.text(max_size=40)
    | st.sampled_from(["good.png", "../x", "/etc/passwd", "a\x00b", "\ud800", "\udcff" * 300])
    | st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape"))
    | st.none()
    | st.integers()
    | st.floats()
)


@FUZZ
@given(st.lists(ROW_VALUES, max_size=6))
def test_each_served_path_row_resolves_inside_the_root_or_gets_its_own_error(tmp_path_factory, rows):
    from unittest import mock

    root = tmp_path_factory.getbasetemp() / "fuzz-serve"
    root.mkdir(exist_ok=True)
    with mock.patch.dict(os.environ, {SERVE_ROOT_ENV: str(root)}):
        resolved = resolve_paths(rows)
    assert len(resolved) == len(rows)
    for index, r in enumerate(resolved):
        assert r.is_relative_to(root.resolve()) if isinstance(r, Path) else r.startswith(f"row {index}: ")


NUMBER_TEXT = (
    st.sampled_from(["nan", "inf", "-inf", "1e400", "-0", "0x10", "1_000", " 3 ", "", "1e-12", "9" * 40])
    | st.integers().map(str)
    | st.floats().map(str)
    | st.text(max_size=8)
)


@FUZZ
@given(st.sampled_from(["--batch-size", "--threads", "--max-pixels", "--max-memory-gb"]), NUMBER_TEXT)
def test_a_numeric_score_option_is_in_its_range_or_a_usage_error(option, text):
    import contextlib
    import io
    import math

    from qualiclip.pipeline.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(["score", "a.png", "--out", "s.csv", f"{option}={text}"])
    except SystemExit as exc:
        assert exc.code == 2 and f"argument {option}: " in err.getvalue() and "Traceback" not in err.getvalue()
        return
    value = getattr(args, option.lstrip("-").replace("-", "_"))
    ranges = {
        "--batch-size": (1, 65_536),
        "--threads": (0, 1024),
        "--max-pixels": (1, 1 << 31),
        "--max-memory-gb": (0.001, 1e6),
    }
    low, high = ranges[option]
    assert math.isfinite(value) and low <= value <= high
