"""The ingest stage on a corpus of bad and odd files, the split, determinism and the default."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

# The helpers below are also in test_imageio.py; tests/ is not a package, so they are repeated.
from conftest import run_unprivileged, world_readable_dir  # noqa: E402
from imagefiles import encode, finishes_despite_fifos, noise, png_header_only  # noqa: E402
from PIL import Image

from qualiclip.config import ConfigError, build_config
from qualiclip.ingest import (
    REJECT_REASONS,
    SKIMAGE_IMAGES,
    IngestConfig,
    IngestError,
    assign_splits,
    run_ingest,
    skimage_root,
)

ACCEPTED = "accepted"
MIN_SIZE = 32
# Every file of the corpus and its outcome: "accepted" or the rejection reason.
EXPECTED: dict[str, str] = {
    "a.png": ACCEPTED,  # the original the duplicates point at
    "zero.jpg": "zero_bytes",
    "text.jpg": "not_an_image",
    "trunc.jpg": "truncated",
    "trunc.png": "truncated",
    "trunc_header.png": "truncated",  # PNG signature, header cut
    "trunc.webp": "truncated",
    "tiny.png": "too_small",
    "bomb.png": "too_large",  # header declares 10^10 pixels
    "float.tif": "unsupported_mode",  # 32-bit float TIFF: no defined range
    "dup_exact.png": "duplicate",  # same bytes as a.png
    "dup_as_bmp.bmp": "duplicate",  # same pixels as a.png, other format
    "cmyk.jpg": ACCEPTED,
    "palette_trns.png": ACCEPTED,
    "grey.png": ACCEPTED,
    "one_bit.png": ACCEPTED,
    "sixteen.png": ACCEPTED,
    "grey_alpha.png": ACCEPTED,
    "rgba.png": ACCEPTED,
    "exif6.jpg": ACCEPTED,
    "lossless.webp": ACCEPTED,
    "img.tiff": ACCEPTED,
    "img.bmp": ACCEPTED,
    "UPPER.JPG": ACCEPTED,
    "lies.jpg": ACCEPTED,  # PNG bytes named .jpg: decoded by content
    "nested/deeper/deep.png": ACCEPTED,
    "link_in.png": "duplicate",  # symlink inside the root: read, dup of its target
    "link_out.png": "symlink_outside_root",
    "link_broken.png": "unreadable",
    "linked_dir": "symlink_outside_root",  # directory link leaving the root: not followed
    "notes.txt": "unsupported_extension",  # listed, not silently skipped
    ".DS_Store": "unsupported_extension",
}


def _img(seed: int, mode: str = "RGB", w: int = 64, h: int = 48) -> Image.Image:
    return Image.fromarray(noise(seed, w, h)).convert(mode)


def _palette_with_transparency() -> Image.Image:
    return _img(14).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)  # saved with index 0 transparent


def _corpus_bytes() -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg, png, webp = (encode(_img(s), f) for s, f in ((20, "JPEG"), (21, "PNG"), (22, "WEBP")))
    a_png = encode(_img(1), "PNG")
    rgba = np.dstack([noise(17), noise(18, channels=1)])
    return {
        "a.png": a_png,
        "zero.jpg": b"",
        "text.jpg": b"meeting notes, definitely not a JPEG\n",
        "trunc.jpg": jpeg[: len(jpeg) // 2],
        "trunc.png": png[: len(png) // 2],
        "trunc_header.png": png[:20],
        "trunc.webp": webp[: len(webp) // 2],
        "tiny.png": encode(_img(2, w=20, h=20), "PNG"),
        "bomb.png": png_header_only(100_000, 100_000),
        "dup_exact.png": a_png,
        "dup_as_bmp.bmp": encode(_img(1), "BMP"),
        "cmyk.jpg": encode(_img(3, "CMYK"), "JPEG"),
        "palette_trns.png": encode(_palette_with_transparency(), "PNG", transparency=0),
        "grey.png": encode(_img(4, "L"), "PNG"),
        "one_bit.png": encode(_img(5, "1"), "PNG"),
        "sixteen.png": encode(Image.fromarray(noise(6, channels=1).astype(np.uint16) * 257), "PNG"),
        "grey_alpha.png": encode(_img(7, "LA"), "PNG"),
        "rgba.png": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "exif6.jpg": encode(_img(8), "JPEG", exif=exif.tobytes()),
        "lossless.webp": encode(_img(9), "WEBP", lossless=True),
        "img.tiff": encode(_img(10), "TIFF"),
        "float.tif": encode(Image.fromarray(noise(19, channels=1).astype(np.float32) / 255), "TIFF"),
        "img.bmp": encode(_img(11), "BMP"),
        "UPPER.JPG": encode(_img(12), "JPEG"),
        "lies.jpg": encode(_img(13), "PNG"),
        "nested/deeper/deep.png": encode(_img(15), "PNG"),
        "notes.txt": b"remember the milk\n",
        ".DS_Store": b"\x00\x00\x00\x01Bud1",
    }


def build_corpus(base: Path) -> Path:
    """A source folder holding every kind of file in `EXPECTED`; returns its root."""
    root, outside = base / "photos", base / "elsewhere"
    for rel, data in _corpus_bytes().items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    outside.mkdir()
    (outside / "secret.png").write_bytes(encode(_img(16), "PNG"))
    os.symlink(root / "a.png", root / "link_in.png")
    os.symlink(outside / "secret.png", root / "link_out.png")
    os.symlink(root / "gone.png", root / "link_broken.png")
    os.symlink(outside, root / "linked_dir")
    return root


def cfg_for(*sources: Path | str, **kw) -> IngestConfig:
    return IngestConfig(sources=tuple(str(s) for s in sources), min_size=kw.pop("min_size", MIN_SIZE), **kw)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("corpus")
    root = build_corpus(base)
    run_ingest(cfg_for(root), base / "out", progress=False)
    return root, base / "out"


def test_corpus_has_at_least_20_kinds():
    assert len(EXPECTED) >= 20 and len(set(EXPECTED.values()) - {ACCEPTED}) >= 10


def test_every_file_has_its_expected_outcome(corpus):
    _, out = corpus
    accepted = {r["path"]: ACCEPTED for r in read_csv(out / "manifest.csv")}
    rejected = {r["path"]: r["reason"] for r in read_csv(out / "rejected.csv")}
    assert not set(accepted) & set(rejected)
    assert {**accepted, **rejected} == EXPECTED


def test_manifest_rows_describe_the_normalised_copies(corpus):
    root, out = corpus
    rows = {r["path"]: r for r in read_csv(out / "manifest.csv")}
    assert {r["split"] for r in rows.values()} == {"train", "val"}
    for rel, row in rows.items():
        with Image.open(out / "images" / f"{row['id']}.png") as im:
            assert im.mode == "RGB" and im.size == (int(row["width"]), int(row["height"]))
        assert int(row["bytes"]) == (root / rel).stat().st_size and len(row["sha256"]) == 64
    assert (rows["exif6.jpg"]["width"], rows["exif6.jpg"]["height"]) == ("48", "64")
    assert (rows["lies.jpg"]["format"], rows["cmyk.jpg"]["mode"]) == ("PNG", "CMYK")
    assert (rows["sixteen.png"]["mode"], rows["palette_trns.png"]["mode"]) == ("I;16", "P")
    assert rows["lossless.webp"]["format"] == "WEBP" and rows["img.tiff"]["format"] == "TIFF"
    assert sorted(p.stem for p in (out / "images").iterdir()) == sorted(r["id"] for r in rows.values())


def test_rejections_explain_themselves(corpus):
    _, out = corpus
    rows = {r["path"]: r for r in read_csv(out / "rejected.csv")}
    a_id = next(r["id"] for r in read_csv(out / "manifest.csv") if r["path"] == "a.png")
    for dup in ("dup_exact.png", "dup_as_bmp.bmp", "link_in.png"):
        assert rows[dup]["detail"] == f"duplicate of {a_id} (a.png)"
    assert "shorter side 20 < ingest.min_size=32" in rows["tiny.png"]["detail"]
    assert "max_pixels=89478485" in rows["bomb.png"]["detail"]
    assert "elsewhere" in rows["link_out.png"]["detail"]


def test_summary_counts_match_the_reports(corpus):
    _, out = corpus
    summary = json.loads((out / "summary.json").read_text())
    outcomes = list(EXPECTED.values())
    assert set(summary["rejected"]) == set(REJECT_REASONS)
    for reason in REJECT_REASONS:
        assert summary["rejected"][reason] == outcomes.count(reason), reason
    assert summary["n_accepted"] == outcomes.count(ACCEPTED) == summary["n_train"] + summary["n_val"]
    assert summary["n_rejected"] == len(outcomes) - outcomes.count(ACCEPTED)


def test_rerun_is_byte_identical_whatever_the_workers(corpus, tmp_path):
    root, out = corpus
    again = tmp_path / "again"
    again.mkdir()
    (again / "summary.json").write_text("{}")  # an old output: replaced cleanly
    run_ingest(cfg_for(root, workers=1), again, progress=False)
    assert tree_bytes(again) == tree_bytes(out)


def test_nothing_usable_fails_clearly_and_still_writes_the_report(tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "zero.jpg").write_bytes(b"")
    (src / "tiny.png").write_bytes(encode(_img(1, w=8, h=8), "PNG"))
    with pytest.raises(IngestError, match=r"no usable image.*bad.*rejected\.csv"):
        run_ingest(cfg_for(src), tmp_path / "out", progress=False)
    reasons = [r["reason"] for r in read_csv(tmp_path / "out" / "rejected.csv")]
    assert reasons == ["too_small", "zero_bytes"]


def test_bad_sources_and_outputs_are_refused(tmp_path):
    with pytest.raises(IngestError, match="is not a folder"):
        run_ingest(cfg_for(tmp_path / "nope"), tmp_path / "out", progress=False)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(encode(_img(1), "PNG"))
    with pytest.raises(IngestError, match="overlaps the source folder"):
        run_ingest(cfg_for(src), src / "out", progress=False)
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "thesis.tex").write_text("do not delete")
    with pytest.raises(IngestError, match="refusing to delete"):
        run_ingest(cfg_for(src), keep, progress=False)
    assert (keep / "thesis.tex").exists()


def test_duplicates_across_sources_name_the_first_source(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
        (folder / "x.png").write_bytes(encode(_img(1), "PNG"))
    run_ingest(cfg_for(one, two), tmp_path / "out", progress=False)
    (row,) = read_csv(tmp_path / "out" / "rejected.csv")
    assert row["source"] == str(two) and row["detail"].endswith(f"({one}: x.png)")


def test_names_that_are_not_utf8_are_reported_not_fatal(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / os.fsdecode(b"caf\xe9.png")).write_bytes(encode(_img(1), "PNG"))
    run_ingest(cfg_for(src), tmp_path / "out", progress=False)
    assert [r["path"] for r in read_csv(tmp_path / "out" / "manifest.csv")] == ["caf\\udce9.png"]


def test_split_is_by_hash_with_one_of_each_for_tiny_sets():
    ids = ["0" * 16, "4" * 16, "c" * 16]  # fractions 0, 0.27, 0.77
    assert assign_splits(ids, 0.25) == {ids[0]: "val", ids[1]: "train", ids[2]: "train"}
    assert assign_splits(ids[1:], 0.25) == {ids[1]: "val", ids[2]: "train"}  # none < 0.25
    assert assign_splits(ids[:2], 0.9) == {ids[0]: "val", ids[1]: "train"}  # all < 0.9
    assert assign_splits(ids, 0.0) == dict.fromkeys(ids, "train")
    assert assign_splits(ids[:1], 0.5) == {ids[0]: "val"}


def test_config_from_params_section():
    cfg = build_config(
        IngestConfig, {"sources": "data/raw", "background": [0, 0, 0], "val_fraction": 0}, where="ingest"
    )
    assert cfg.sources == ("data/raw",) and cfg.background == (0, 0, 0) and cfg.val_fraction == 0.0
    with pytest.raises(ConfigError, match="did you mean 'min_size'"):
        build_config(IngestConfig, {"min_sise": 3}, where="ingest")
    with pytest.raises(ConfigError, match=r"ingest.val_fraction must be a number in \[0, 1\), got 1.5"):
        IngestConfig(val_fraction=1.5)
    with pytest.raises(ConfigError, match="ingest.background"):
        IngestConfig(background=(0, 0, 300))


def test_skimage_default_source(tmp_path):
    assert all((skimage_root() / name).is_file() for name in SKIMAGE_IMAGES)
    result = run_ingest(IngestConfig(), tmp_path / "out", progress=False)
    assert result.n_accepted == len(SKIMAGE_IMAGES) >= 10 and result.n_rejected == 0
    assert result.n_val >= 1 and result.n_train >= 1
    for png in (tmp_path / "out" / "images").iterdir():
        with Image.open(png) as im:
            assert im.mode == "RGB" and min(im.size) >= 224


# ---------------------------------------------------------------------------------------------
# Special files (issue 19): nothing hangs, nothing crashes, nothing is skipped silently


def test_a_fifo_named_like_a_photo_is_rejected_not_opened(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "ok.png").write_bytes(encode(_img(30), "PNG"))
    os.mkfifo(root / "pipe.jpg")  # opening it for reading would wait for a writer forever
    finishes_despite_fifos(lambda: run_ingest(cfg_for(root), tmp_path / "out", progress=False), [root / "pipe.jpg"])
    rejected = {r["path"]: r for r in read_csv(tmp_path / "out" / "rejected.csv")}
    assert rejected["pipe.jpg"]["reason"] == "not_a_file" and "FIFO" in rejected["pipe.jpg"]["detail"]
    assert [r["path"] for r in read_csv(tmp_path / "out" / "manifest.csv")] == ["ok.png"]


def test_symlink_loops_are_reported_per_file(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "ok.png").write_bytes(encode(_img(31), "PNG"))
    os.symlink("self.jpg", root / "self.jpg")  # a file linked to itself
    os.symlink("b.jpg", root / "a.jpg")  # a -> b -> a
    os.symlink("a.jpg", root / "b.jpg")
    run_ingest(cfg_for(root), tmp_path / "out", progress=False)
    rejected = {r["path"]: r for r in read_csv(tmp_path / "out" / "rejected.csv")}
    assert {p: r["reason"] for p, r in rejected.items()} == dict.fromkeys(
        ["a.jpg", "b.jpg", "self.jpg"], "symlink_loop"
    )
    assert "symlink loop" in rejected["self.jpg"]["detail"]


def test_an_unreadable_folder_is_reported_in_rejected_csv():
    base = world_readable_dir()
    root, locked = base / "photos", base / "photos" / "locked"
    try:
        locked.mkdir(parents=True)
        root.chmod(0o755)
        (root / "ok.png").write_bytes(encode(_img(32), "PNG"))
        (locked / "hidden.png").write_bytes(encode(_img(33), "PNG"))
        locked.chmod(0o000)  # its photos cannot even be listed
        run_unprivileged(lambda: run_ingest(cfg_for(root), base / "out", progress=False))
        rejected = {r["path"]: r for r in read_csv(base / "out" / "rejected.csv")}
        assert rejected["locked"]["reason"] == "unreadable"
        assert "cannot be listed" in rejected["locked"]["detail"] and "not ingested" in rejected["locked"]["detail"]
    finally:
        locked.chmod(0o755)
        shutil.rmtree(base)
