"""Dataset registry: real CLIVE label files and images, and tiny synthetic folders per layout."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from qualiclip.datasets import DatasetError, IQAItem, clive_labels, dataset_spec, list_datasets, load_dataset

ALL = ["agiqa3k", "clive", "csiq", "csv", "flive", "kadid10k", "koniq10k", "live", "pyiqa", "spaq", "tid2013"]


def write_image(path: Path, size=(8, 6), value=128) -> Path:
    """A tiny real image; the format follows the suffix (png, jpg, bmp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value // 2, 255 - value)).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------- registry and options


def test_registry_lists_every_layout():
    assert list_datasets() == ALL
    assert dataset_spec("csiq").lower_is_better and not dataset_spec("koniq10k").lower_is_better
    assert dataset_spec("spaq").resize_short_side == 512
    assert dataset_spec("csv") is None  # the caller declares it


def test_unknown_name_suggests_the_close_one(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'kadid' — did you mean 'kadid10k'"):
        load_dataset("kadid", tmp_path)


def test_unknown_and_missing_options_are_named(tmp_path):
    with pytest.raises(DatasetError, match="no option 'resolutoin' — did you mean 'resolution'"):
        load_dataset("koniq10k", tmp_path, resolutoin="512x384")
    with pytest.raises(DatasetError, match=r"needs option\(s\) \['mos_range', 'lower_is_better'\]"):
        load_dataset("csv", tmp_path)
    with pytest.raises(DatasetError, match="on_missing must be"):
        load_dataset("clive", tmp_path, on_missing="skip")


def test_missing_root_and_label_file(tmp_path):
    with pytest.raises(DatasetError, match="is not a folder"):
        load_dataset("clive", tmp_path / "nope")
    with pytest.raises(DatasetError, match="label file not found at .*Data/AllImages_release.mat"):
        load_dataset("clive", tmp_path)


# ---------------------------------------------------------------- CLIVE, real files


def test_clive_official_label_files_parse(clive_dir):
    official = clive_dir / "official"
    everything = clive_labels(official, include_training=True)
    rated = clive_labels(official)
    assert len(everything) == 1169 and len(rated) == 1162
    assert [Path(r.name).stem for r in everything[:7]] == [f"t{i}" for i in range(1, 8)]
    assert rated == everything[7:]
    mos = np.array([r.raw_mos for r in rated])
    assert 0 <= mos.min() < mos.max() <= 100


@pytest.fixture
def clive_partial(clive_dir, tmp_path) -> Path:
    """The official CLIVE layout with only the 250 development images present."""
    root = tmp_path / "ChallengeDB_release"
    (root / "Images").mkdir(parents=True)
    (root / "Data").mkdir()
    for image in (clive_dir / "images").iterdir():
        os.symlink(image, root / "Images" / image.name)
    for mat in (clive_dir / "official").glob("*.mat"):
        os.symlink(mat, root / "Data" / mat.name)
    return root


def test_clive_official_layout_with_missing_images_is_an_error(clive_partial):
    with pytest.raises(DatasetError) as err:
        load_dataset("clive", clive_partial)
    message = str(err.value)
    assert "912 problem(s)" in message and "missing image: 912" in message
    assert "on_missing='exclude'" in message
    assert "Images/100.bmp (missing image)" in message  # the first rated entry, not a t1-t7 one


def test_clive_exclude_keeps_the_250_present_images_with_their_mos(clive_dir, clive_partial):
    ds = load_dataset("clive", clive_partial, on_missing="exclude")
    assert len(ds) == 250 and ds.mos_range == (0.0, 100.0) and not ds.lower_is_better
    assert len(ds.report) == 912 and {reason for _, reason in ds.report} == {"missing image"}
    with open(clive_dir / "labels.csv") as f:
        expected = {row["image"]: float(row["mos"]) for row in csv.DictReader(f)}
    got = {item.path.name: item.mos for item in ds.items}  # .bmp labels resolve to the .png re-encodes
    assert got.keys() == expected.keys()
    assert all(got[name] == pytest.approx(expected[name], abs=1e-9) for name in expected)
    assert ds.splits == () and all(item.path.is_file() for item in ds.items)


def test_clive_dev_reads_as_a_generic_csv(clive_dir):
    ds = load_dataset("csv", clive_dir, image_dir="images", mos_range=(0, 100), lower_is_better=False)
    assert len(ds) == 250 and ds.mos().dtype == np.float64 and ds.report == ()


# ---------------------------------------------------------------- validation


@pytest.fixture
def small_csv_set(tmp_path) -> Path:
    for name in ("a.png", "b.png", "c.jpg"):
        write_image(tmp_path / "img" / name)
    write_csv(tmp_path / "labels.csv", ["image", "mos"], [["a.png", 1], ["b.png", 2], ["c.jpg", 3]])
    return tmp_path


def _load_small(root, **kw):
    return load_dataset("csv", root, image_dir="img", mos_range=(0, 5), lower_is_better=False, **kw)


def test_every_kind_of_problem_is_named_and_counted(small_csv_set):
    root = small_csv_set
    (root / "img" / "b.png").write_bytes(b"not an image")
    write_image(root / "img" / "stray.png")
    write_csv(
        root / "labels.csv", ["image", "mos"], [["a.png", 1], ["b.png", 2], ["c.jpg", 3], ["gone.png", 4], ["a.png", 5]]
    )
    with pytest.raises(DatasetError) as err:
        _load_small(root)
    message = str(err.value)
    for part in (
        "4 problem(s)",
        "missing image: 1",
        "duplicate label: 1",
        "unreadable image: 1",
        "image without a label: 1",
        "gone.png",
        "stray.png",
    ):
        assert part in message
    ds = _load_small(root, on_missing="exclude")
    assert [i.path.name for i in ds.items] == ["a.png", "c.jpg"]
    assert {p.name: r.split(" (")[0] for p, r in ds.report} == {
        "b.png": "unreadable image",
        "gone.png": "missing image",
        "a.png": "duplicate label",
        "stray.png": "image without a label",
    }


def test_offender_list_is_capped_but_count_is_complete(small_csv_set):
    rows = [["a.png", 1]] + [[f"m{i}.png", 1] for i in range(20)]
    write_csv(small_csv_set / "labels.csv", ["image", "mos"], rows)
    write_image(small_csv_set / "img" / "b.png")
    (small_csv_set / "img" / "c.jpg").unlink()
    with pytest.raises(DatasetError, match="missing image: 20") as err:
        _load_small(small_csv_set)
    assert "m4.png" in str(err.value) and "m5.png" not in str(err.value)


def test_out_of_range_scores_warn(small_csv_set):
    with pytest.warns(UserWarning, match="1 score\\(s\\) outside the declared mos_range"):
        load_dataset("csv", small_csv_set, image_dir="img", mos_range=(0, 2.5), lower_is_better=False)


def test_declared_options_are_checked(small_csv_set):
    with pytest.raises(DatasetError, match="mos_range must be two numbers"):
        load_dataset("csv", small_csv_set, mos_range=5, lower_is_better=False)
    with pytest.raises(DatasetError, match="lower_is_better must be true or false"):
        load_dataset("csv", small_csv_set, mos_range=(0, 5), lower_is_better="no")


def test_lower_is_better_is_flipped_within_the_range_and_splits_filter(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        write_image(tmp_path / name)
    write_csv(
        tmp_path / "labels.csv",
        ["image", "mos", "split"],
        [["a.png", 10, "training"], ["b.png", 30, "test"], ["c.png", 90, ""]],
    )
    ds = load_dataset("csv", tmp_path, mos_range=[0, 100], lower_is_better=True)
    np.testing.assert_allclose(ds.mos(), [90, 70, 10])
    np.testing.assert_allclose(ds.raw_mos(), [10, 30, 90])
    assert ds.splits == ("test", "train")
    assert ds.split("test").paths() == [tmp_path / "b.png"]
    with pytest.raises(DatasetError, match=r"splits \['test', 'train'\], not 'val'"):
        ds.split("val")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.items[0].mos = 1.0  # type: ignore[misc]


def test_item_defaults_raw_mos_to_mos():
    assert IQAItem(Path("x.png"), 3.0).raw_mos == 3.0


# ---------------------------------------------------------------- each release layout

KONIQ_HEADER = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"]


def test_koniq10k_release_with_official_sets(tmp_path):
    names = ["1.jpg", "2.jpg", "3.jpg"]
    for n in names:
        write_image(tmp_path / "1024x768" / n)
        write_image(tmp_path / "512x384" / n)
    write_csv(
        tmp_path / "koniq10k_scores_and_distributions.csv",
        KONIQ_HEADER,
        [[n, 0, 0, 0, 0, 0, 0, 1.5 + i, 0.5, 40] for i, n in enumerate(names)],
    )
    ds = load_dataset("koniq10k", tmp_path)
    assert ds.splits == () and ds.paths()[0].parent.name == "1024x768"
    np.testing.assert_allclose(ds.mos(), [1.5, 2.5, 3.5])
    write_csv(
        tmp_path / "koniq10k_distributions_sets.csv",
        KONIQ_HEADER[:-1] + ["set"],
        [
            [n, 0, 0, 0, 0, 0, 0, 1.5 + i, 0.5, s]
            for i, (n, s) in enumerate(zip(names, ["training", "validation", "test"]))
        ],
    )
    small = load_dataset("koniq10k", tmp_path, resolution="512x384")
    assert small.paths()[0].parent.name == "512x384" and small.splits == ("test", "train", "val")
    assert small.split("test").paths() == [tmp_path / "512x384" / "3.jpg"]
    with pytest.raises(DatasetError, match="resolution must be one of"):
        load_dataset("koniq10k", tmp_path, resolution="640x480")


def test_spaq_reads_a_csv_export_and_declares_the_resize(tmp_path):
    write_image(tmp_path / "TestImage" / "00001.jpg")
    write_image(tmp_path / "TestImage" / "00002.jpg")
    with pytest.raises(DatasetError, match="label sheet not found"):
        load_dataset("spaq", tmp_path)
    sheet = tmp_path / "Annotations" / "MOS and Image attribute scores.xlsx"
    sheet.parent.mkdir()
    sheet.write_bytes(b"PK placeholder")
    if importlib.util.find_spec("openpyxl") is None:
        with pytest.raises(DatasetError, match="needs openpyxl .* or save the sheet as"):
            load_dataset("spaq", tmp_path)
    write_csv(
        tmp_path / "Annotations" / "MOS and Image attribute scores.csv",
        ["Image name", "MOS", "Brightness"],
        [["00001.jpg", 42.0, 50], ["00002.jpg", 77.5, 60]],
    )
    ds = load_dataset("spaq", tmp_path)
    assert ds.resize_short_side == 512 and ds.mos_range == (0.0, 100.0)
    np.testing.assert_allclose(ds.mos(), [42.0, 77.5])


def test_flive_images_in_subfolders_with_pyiqa_splits(tmp_path):
    base = tmp_path / "database"
    names = ["AVA__/1.jpg", "AVA__/2.jpg", "voc_emotic_ava/3.jpg", "EE371R/4.jpg"]
    for n in names:
        write_image(base / n)
    write_csv(
        base / "labels_image.csv", ["name", "mos", "height", "width"], [[n, 60 + i, 6, 8] for i, n in enumerate(names)]
    )
    write_csv(base / "labels640.csv", ["name_image", "mos_image"], [[names[3], 63]])
    write_csv(
        base / "labels=640_padded.csv",
        ["name_image", "mos_image", "is_valid"],
        [[names[0], 60, "False"], [names[1], 61, "True"], [names[2], 62, "False"]],
    )
    ds = load_dataset("flive", tmp_path)
    assert [i.split for i in ds.items] == ["train", "val", "train", "test"]
    assert ds.split("test").paths() == [base / "EE371R" / "4.jpg"]


def test_kadid10k_references_in_the_folder_are_not_unlabelled(tmp_path):
    for n in ("I01.png", "I01_01_01.png", "I01_01_02.png"):
        write_image(tmp_path / "images" / n)
    write_csv(
        tmp_path / "dmos.csv",
        ["dist_img", "ref_img", "dmos", "var"],
        [["I01_01_01.png", "I01.png", 4.57, 0.5], ["I01_01_02.png", "I01.png", 4.33, 0.8]],
    )
    ds = load_dataset("kadid10k", tmp_path)
    assert len(ds) == 2 and not ds.lower_is_better
    np.testing.assert_allclose(ds.mos(), [4.57, 4.33])


def test_csiq_finds_images_in_type_subfolders_and_flips_dmos(tmp_path):
    write_image(tmp_path / "dst_imgs" / "awgn" / "1600.AWGN.1.png")
    write_image(tmp_path / "dst_imgs" / "jpeg" / "1600.JPEG.5.png")
    write_image(tmp_path / "src_imgs" / "1600.png")
    (tmp_path / "csiq_label.txt").write_text("1600.AWGN.1.png 0.062\n1600.JPEG.5.png 0.81\n\n")
    ds = load_dataset("csiq", tmp_path)
    assert ds.lower_is_better and ds.mos_range == (0.0, 1.0)
    np.testing.assert_allclose(ds.raw_mos(), [0.062, 0.81])
    np.testing.assert_allclose(ds.mos(), [0.938, 0.19])
    assert ds.paths()[1] == tmp_path / "dst_imgs" / "jpeg" / "1600.JPEG.5.png"


def test_tid2013_matches_names_ignoring_case(tmp_path):
    write_image(tmp_path / "distorted_images" / "i01_01_1.bmp")
    write_image(tmp_path / "distorted_images" / "I25_01_1.bmp")
    (tmp_path / "mos_with_names.txt").write_text("5.51429 i01_01_1.bmp\n5.56757 i25_01_1.bmp\n")
    ds = load_dataset("tid2013", tmp_path)
    assert [p.name for p in ds.paths()] == ["i01_01_1.bmp", "I25_01_1.bmp"]
    np.testing.assert_allclose(ds.mos(), [5.51429, 5.56757])
    assert ds.mos_range == (0.0, 9.0) and not ds.lower_is_better


def test_live_drops_reference_copies_and_flips_dmos(tmp_path):
    n = 982
    dmos = np.linspace(10, 90, n)
    orgs = np.zeros(n)
    orgs[0] = 1  # jp2k/img1.bmp is a reference copy: present on disk, not rated
    scipy.io.savemat(tmp_path / "dmos.mat", {"dmos": dmos[None, :], "orgs": orgs[None, :]})
    for k in (1, 2, 3):
        write_image(tmp_path / "jp2k" / f"img{k}.bmp")
    (tmp_path / "jp2k" / "info.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="missing image: 979"):
        load_dataset("live", tmp_path)
    ds = load_dataset("live", tmp_path, on_missing="exclude")
    assert [p.name for p in ds.paths()] == ["img2.bmp", "img3.bmp"]
    np.testing.assert_allclose(ds.mos(), 100 - dmos[1:3])
    assert not any(reason == "image without a label" for _, reason in ds.report)


def test_live_rejects_a_mat_of_the_wrong_length(tmp_path):
    scipy.io.savemat(tmp_path / "dmos.mat", {"dmos": np.ones((1, 10)), "orgs": np.zeros((1, 10))})
    with pytest.raises(DatasetError, match="expected 982 dmos/orgs entries"):
        load_dataset("live", tmp_path)


def test_agiqa3k_reads_quality_or_alignment(tmp_path):
    write_image(tmp_path / "AGIQA-3K" / "sd1.5_normal_000.jpg")
    write_image(tmp_path / "AGIQA-3K" / "sd1.5_normal_001.jpg")
    write_csv(
        tmp_path / "data.csv",
        ["name", "prompt", "mos_quality", "std_quality", "mos_align", "std_align"],
        [["sd1.5_normal_000.jpg", "a cat", 2.1, 0.4, 3.0, 0.3], ["sd1.5_normal_001.jpg", "a dog", 3.4, 0.5, 2.2, 0.3]],
    )
    np.testing.assert_allclose(load_dataset("agiqa3k", tmp_path).mos(), [2.1, 3.4])
    np.testing.assert_allclose(load_dataset("agiqa3k", tmp_path, score="mos_align").mos(), [3.0, 2.2])


def test_pyiqa_nr_meta_info_with_split_column(tmp_path):
    for n in ("1.jpg", "2.jpg", "3.jpg"):
        write_image(tmp_path / "koniq" / n)
    write_csv(
        tmp_path / "meta_info_KonIQ10kDataset.csv",
        ["img_name", "mos", "std", "split"],
        [["1.jpg", 3.1, 0.5, "train"], ["2.jpg", 2.2, 0.6, "val"], ["3.jpg", 4.0, 0.4, "test"]],
    )
    ds = load_dataset(
        "pyiqa",
        tmp_path,
        meta_info="meta_info_KonIQ10kDataset.csv",
        image_dir="koniq",
        mos_range=(1, 5),
        lower_is_better=False,
    )
    assert ds.split("test").mos().tolist() == [4.0] and ds.splits == ("test", "train", "val")


def test_pyiqa_fr_meta_info_with_split_file(tmp_path):
    for n in ("ref.png", "d1.png", "d2.png"):
        write_image(tmp_path / "imgs" / n)
    write_csv(
        tmp_path / "meta.csv",
        ["ref_name", "dist_name", "dmos"],
        [["ref.png", "d1.png", 20.0], ["ref.png", "d2.png", 55.0]],
    )
    with open(tmp_path / "split.pkl", "wb") as f:
        pickle.dump({1: {"train": [1], "val": [], "test": [0]}}, f)
    common = dict(meta_info="meta.csv", image_dir="imgs", mos_range=(0, 100), lower_is_better=True)
    assert load_dataset("pyiqa", tmp_path, **common).splits == ()  # ref.png beside them is expected
    ds = load_dataset("pyiqa", tmp_path, split_file="split.pkl", **common)
    assert [p.name for p in ds.paths()] == ["d1.png", "d2.png"] and ds.report == ()
    np.testing.assert_allclose(ds.mos(), [80.0, 45.0])
    assert [i.split for i in ds.items] == ["test", "train"]


class _Touch:
    """A pickled object whose loading runs code: it creates ``path`` (what an attacker's would do worse)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_split_file_is_never_unpickled_into_code(tmp_path):
    for n in ("d1.png", "d2.png"):
        write_image(tmp_path / "imgs" / n)
    write_csv(tmp_path / "meta.csv", ["dist_name", "dmos"], [["d1.png", 20.0], ["d2.png", 55.0]])
    common = dict(meta_info="meta.csv", image_dir="imgs", mos_range=(0, 100), lower_is_better=True)
    marker = tmp_path / "code_ran"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({1: {"train": [0], "test": [1], "x": _Touch(marker)}}, f)
    with pytest.raises(
        DatasetError, match="evil.pkl is not a plain pyiqa split file.*names pathlib.*re-save it as JSON"
    ):
        load_dataset("pyiqa", tmp_path, split_file="evil.pkl", **common)
    assert not marker.exists()
    (tmp_path / "split.json").write_text('{"1": {"train": [0], "val": [], "test": [1]}}')
    ds = load_dataset("pyiqa", tmp_path, split_file="split.json", **common)
    assert [i.split for i in ds.items] == ["train", "test"]
