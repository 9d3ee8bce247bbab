"""Scoring: the inference copy, batching, the user API and the ``qualiclip score`` CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from imagefiles import finishes_despite_fifos
from PIL import Image

from qualiclip.model import ModelConfig, create_model
from qualiclip.scoring import (
    ScoringError,
    inference_copy,
    plan_batches,
    score_arrays,
    score_images,
    score_paths,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    """See conftest.one_thread."""


def discriminative(model, images):
    """Point the prompt pair along the top principal direction of these images' features.

    A random tiny model maps every image to nearly the same feature, so its scores agree to ~1e-5
    and a 1e-5 comparison would prove nothing; with prompts ±u the scores spread over [0, 1].
    """
    with torch.no_grad():
        f = torch.cat([model.encode(torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255) for im in images])
    u = torch.linalg.svd(f - f.mean(0), full_matrices=False).Vh[0]
    model.prompt_features = torch.stack([u, -u])  # one pair (K = 1)
    return model


def randomise_batchnorm(model, seed=0):
    """Non-trivial BatchNorm statistics, so that folding them is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, lo, hi in (
                (m.running_mean, -0.5, 0.5),
                (m.running_var, 0.5, 2.0),
                (m.weight.data, 0.5, 1.5),
                (m.bias.data, -0.3, 0.3),
            ):
                t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    return model


@pytest.fixture(scope="module")
def images():
    import skimage.data

    rng = np.random.default_rng(0)
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    ims = [np.ascontiguousarray(p[: 64 + 8 * i, :80]) for i, p in enumerate(photos)]  # 3 sizes
    ims += [np.ascontiguousarray(p[100:164, 100:180]) for p in photos]  # 3 more of 64x80
    ims += [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)]
    return ims


@pytest.fixture(scope="module")
def model(images):
    return discriminative(randomise_batchnorm(create_model(ModelConfig()).eval()), images)


def test_inference_copy_matches_the_model(model, images):
    fast = inference_copy(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert not hasattr(fast.clip, "transformer")  # no text tower
    with torch.no_grad():
        for im in images:
            x = torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255
            assert abs(model(x).item() - fast(x).item()) < 1e-5
    assert inference_copy(fast) is fast


def test_batched_equals_one_by_one(model, images):
    batched = score_arrays(model, images, batch_size=4)
    single = np.array([score_arrays(model, [im], batch_size=1)[0] for im in images])
    assert np.ptp(batched) > 0.1  # the scores really differ from image to image
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_plan_batches_groups_equal_sizes_and_caps_pixels():
    shapes = [(10, 10, 3), (20, 10, 3), (10, 10, 3), (10, 10, 3), (20, 10, 3)]
    assert plan_batches(shapes, 2) == [[0, 2], [3], [1, 4]]
    assert plan_batches(shapes, 8, max_batch_pixels=250) == [[0, 2], [3], [1], [4]]
    with pytest.raises(ScoringError, match="batch_size"):
        plan_batches(shapes, 0)


def test_score_images_accepts_paths_arrays_and_tensors(model, images, tmp_path):
    ref = score_arrays(model, images[:3])
    path = tmp_path / "a.png"
    Image.fromarray(images[0]).save(path)
    tensor = torch.from_numpy(images[1]).permute(2, 0, 1).float() / 255
    batch = torch.from_numpy(np.stack(images[2:3])).permute(0, 3, 1, 2)  # (1, 3, H, W) uint8
    got = score_images([str(path), tensor, batch], model)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    with pytest.raises(ScoringError, match="expected"):
        score_images([np.zeros((8, 8))], model)
    with pytest.raises(ScoringError, match="score_paths"):
        score_images([tmp_path / "missing.png"], model)


def test_fp16_on_cpu_names_the_fix(model, images):
    with pytest.raises(ScoringError, match="bf16"):
        score_arrays(model, images[:1], device="cpu", precision="fp16")


def test_score_paths_streams_batch_by_batch(model, images, tmp_path, monkeypatch):
    """At most ``batch_size`` images are decoded before they are scored."""
    import qualiclip.imageio as imageio

    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    live, peak, real = [0], [0], imageio.read_image

    def counting_read(*a, **kw):
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        return real(*a, **kw)

    monkeypatch.setattr(imageio, "read_image", counting_read)

    class Bar:
        def update(self, n):
            live[0] -= n

    paths = sorted(tmp_path.glob("*.png"))
    results = score_paths(paths, model, batch_size=2, progress=Bar())
    assert peak[0] <= 2 and all(r.error == "" for r in results)
    np.testing.assert_allclose(
        [r.score for r in results], score_arrays(model, [real(p).pixels for p in paths]), atol=1e-5
    )


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    from qualiclip.checkpoint import save_checkpoint

    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "checkpoint")


def test_load_scorer_reads_only_the_image_encoder(checkpoint, model, images):
    from qualiclip.scoring import is_inference_copy, load_scorer

    scorer = load_scorer(checkpoint)
    assert is_inference_copy(scorer) and not any(t.is_meta for t in scorer.state_dict().values())
    np.testing.assert_allclose(score_arrays(scorer, images), score_arrays(model, images), atol=1e-5)


def test_cli_scores_files_folders_and_lists_keeping_bad_files(checkpoint, images, tmp_path, capsys):
    from qualiclip.pipeline.cli import main

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, im in enumerate(images[:4]):
        Image.fromarray(im).save(folder / ("sub" if i % 2 else ".") / f"{i}.png")
    (folder / "sub" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 3)
    single = tmp_path / "single.jpg"
    Image.fromarray(images[4]).save(single, quality=95)
    listed = tmp_path / "lists" / "batch.txt"
    listed.parent.mkdir()
    Image.fromarray(images[5]).save(tmp_path / "lists" / "x.png")
    listed.write_text("# my list\nx.png\n\nmissing.png\n")

    out = tmp_path / "scores.csv"
    rc = main(
        [
            "score",
            str(folder),
            str(single),
            str(listed),
            "--model",
            str(checkpoint),
            "--out",
            str(out),
            "--batch-size",
            "3",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == 0
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == [
        "path",
        "score",
        "width",
        "height",
        "error",
        "model",
        "model_version",
        "score_min",
        "score_max",
        "higher_is_better",
    ]
    assert {(r["model"], r["score_min"], r["score_max"], r["higher_is_better"]) for r in rows} == {
        (str(checkpoint.resolve()), "0.0", "1.0", "True")
    }
    assert len(rows) == 4 + 1 + 1 + 1 + 1  # 4 good + corrupt in the folder, single, listed + missing
    bad = {r["path"].rsplit("/", 1)[-1]: r for r in rows if r["error"]}
    assert set(bad) == {"corrupt.jpg", "missing.png"} and all(r["score"] == "" for r in bad.values())
    good = [r for r in rows if not r["error"]]
    assert all(0 <= float(r["score"]) <= 1 for r in good)
    first = next(r for r in good if r["path"].endswith("/0.png"))
    assert (int(first["width"]), int(first["height"])) == (images[0].shape[1], images[0].shape[0])
    assert abs(float(first["score"]) - score_arrays(model_from(checkpoint), images[:1])[0]) < 1e-5
    assert "corrupt.jpg" in capsys.readouterr().err

    out_json = tmp_path / "scores.json"
    assert main(["score", str(single), "--model", str(checkpoint), "--out", str(out_json), "--no-progress"]) == 0
    scored = json.loads(out_json.read_text())
    assert scored["scores"][0]["score"] == pytest.approx(
        float(next(r["score"] for r in rows if r["path"] == str(single))), abs=3e-6
    )
    assert (scored["model"], scored["score_min"], scored["score_max"], scored["higher_is_better"]) == (
        str(checkpoint.resolve()),
        0.0,
        1.0,
        True,
    )


def model_from(checkpoint):
    from qualiclip.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint)


def test_cli_errors_name_the_fix(checkpoint, tmp_path, capsys):
    from qualiclip.pipeline.cli import main

    assert main(["score", str(tmp_path), "--model", str(checkpoint), "--out", str(tmp_path / "s.csv")]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["score", str(tmp_path), "--model", str(checkpoint), "--out", str(tmp_path / "s.xlsx")]) == 2
    assert "--out must end in .csv or .json" in capsys.readouterr().err
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    assert main(["score", str(tmp_path), "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "s.csv")]) == 2
    assert "not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Hostile inputs (issue 19): one bad file never loses the other scores, bad --out is one line


def score_cli(checkpoint, *args):
    from qualiclip.pipeline.cli import main

    return main(["score", *map(str, args), "--model", str(checkpoint), "--device", "cpu", "--no-progress"])


def rows_by_name(out):
    return {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(open(out, encoding="utf-8"))}


def test_cli_reports_fifos_per_file_instead_of_hanging(checkpoint, images, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(images[0]).save(folder / "ok.png")
    os.mkfifo(folder / "pipe.jpg")
    os.mkfifo(tmp_path / "alone.png")
    out = tmp_path / "s.csv"
    fifos = [folder / "pipe.jpg", tmp_path / "alone.png"]
    assert (
        finishes_despite_fifos(lambda: score_cli(checkpoint, folder, tmp_path / "alone.png", "--out", out), fifos) == 0
    )
    rows = rows_by_name(out)
    assert rows["pipe.jpg"]["error"].startswith("not_a_file") and rows["alone.png"]["error"].startswith("not_a_file")
    assert 0 <= float(rows["ok.png"]["score"]) <= 1


def test_images_too_small_for_the_encoder_get_a_per_file_error(checkpoint, images, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(images[0]).save(folder / "ok.png")
    Image.new("RGB", (1, 1), "red").save(folder / "dot.png")
    Image.new("RGB", (100_000, 10), "grey").save(folder / "strip.png")
    out = tmp_path / "s.csv"
    assert score_cli(checkpoint, folder, "--out", out) == 0
    rows = rows_by_name(out)
    assert rows["dot.png"]["error"].startswith("too_small: 1x1 px") and "32 px" in rows["dot.png"]["error"]
    assert rows["strip.png"]["error"].startswith("too_small: 100000x10 px")
    assert abs(float(rows["ok.png"]["score"]) - score_arrays(model_from(checkpoint), images[:1])[0]) < 1e-5


def test_bad_out_paths_are_one_line_errors(checkpoint, images, tmp_path, capsys):
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    (tmp_path / "existing.csv").mkdir()
    assert score_cli(checkpoint, tmp_path / "a.png", "--out", tmp_path / "existing.csv") == 2
    assert "is a folder" in capsys.readouterr().err
    assert score_cli(checkpoint, tmp_path / "a.png", "--out", tmp_path / "a.png" / "s.csv") == 2
    assert "a.png is a file, not a folder" in capsys.readouterr().err


def test_a_file_name_that_is_not_utf8_is_written_to_csv(checkpoint, images, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(images[0]).save(folder / os.fsdecode(b"caf\xe9.png"))  # Latin-1, not UTF-8
    out = tmp_path / "s.csv"
    assert score_cli(checkpoint, folder, "--out", out) == 0
    (row,) = csv.DictReader(open(out, encoding="utf-8"))
    assert row["path"].endswith("caf\\udce9.png") and 0 <= float(row["score"]) <= 1


def test_too_large_message_names_the_scoring_option(checkpoint, tmp_path):
    from imagefiles import png_header_only

    (tmp_path / "bomb.png").write_bytes(png_header_only(5000, 5000))
    out = tmp_path / "s.csv"
    assert score_cli(checkpoint, tmp_path / "bomb.png", "--out", out, "--max-pixels", "1000000") == 0
    error = rows_by_name(out)["bomb.png"]["error"]
    assert error.startswith("too_large") and "raise --max-pixels" in error and "ingest." not in error


def test_an_image_above_the_memory_budget_is_refused_per_file(checkpoint, images, tmp_path):
    from qualiclip.scoring import bytes_per_pixel, load_scorer

    Image.fromarray(images[0]).save(tmp_path / "small.png")
    Image.fromarray(np.tile(images[0], (20, 20, 1))).save(tmp_path / "large.png")  # 1280x1600
    need = 1280 * 1600 * bytes_per_pixel(load_scorer(checkpoint))
    out = tmp_path / "s.csv"
    assert score_cli(checkpoint, tmp_path, "--out", out, "--max-memory-gb", f"{need / 2e9:.4f}") == 0
    rows = rows_by_name(out)
    assert rows["large.png"]["error"].startswith("too_large: 1600x1280 px needs an estimated")
    assert "--max-memory-gb" in rows["large.png"]["error"] and 0 <= float(rows["small.png"]["score"]) <= 1
    assert score_cli(checkpoint, tmp_path, "--out", out, "--max-memory-gb", f"{need / 0.5e9:.4f}") == 0
    assert all(r["error"] == "" for r in rows_by_name(out).values())


@pytest.mark.slow
def test_the_memory_estimate_covers_the_measured_peak():
    """The budget is only a promise if the estimate is not below what scoring really takes
    (measured as benchmarks/bench_score_memory.py measures it: a fresh process, a 4 MP image)."""
    from benchmarks.bench_score_memory import CHILD

    proc = subprocess.run(
        [sys.executable, "-c", CHILD, "qualiclip-tiny-rn", "2048", "2048", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.5 * r["estimated"] < r["measured"] <= r["estimated"], r  # covered, and not wildly above


# ---------------------------------------------------------------------------------------------
# Hostile inputs, round 3 (issue 26): a bad name is one bad row; every number has a checked range


def test_a_list_entry_with_a_nul_byte_is_one_error_row_and_the_others_are_scored(checkpoint, images, tmp_path, capsys):
    Image.fromarray(images[0]).save(tmp_path / "good.png")
    Image.fromarray(images[1]).save(tmp_path / "after.png")
    listed = tmp_path / "list.txt"
    listed.write_bytes(b"good.png\nbad\x00name.png\nafter.png\n")  # e.g. `find -print0` output in a list
    out = tmp_path / "s.csv"
    too_long = tmp_path / ("y" * 300 + ".png")  # an argument the OS refuses (ENAMETOOLONG), not an OSError
    assert score_cli(checkpoint, listed, too_long, "--out", out) == 0
    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == ["good.png", "bad\\x00name.png", "after.png", too_long.name]
    assert rows[1]["error"].startswith("bad_name: the name holds a NUL byte") and rows[1]["score"] == ""
    assert rows[3]["error"].startswith("bad_name: a component of the path is 304 bytes") and rows[3]["score"] == ""
    assert all(0 <= float(r["score"]) <= 1 for r in (rows[0], rows[2]))
    assert "\x00" not in capsys.readouterr().err  # the name is shown escaped, never cut


@pytest.mark.parametrize(
    "name, detail",
    [
        ("bad\x00name.png", "NUL byte"),
        ("lone\ud800surrogate.png", "U+D800 (a lone surrogate)"),
        ("x" * 300 + ".png", "longer than the 255 a file name may be"),
        ("a/" * 2100 + "b.png", "longer than the 4096 a path may be"),
    ],
)
def test_score_paths_reports_a_name_no_file_can_have_per_file(model, images, tmp_path, name, detail):
    Image.fromarray(images[0]).save(tmp_path / "good.png")
    got = score_paths([tmp_path / "good.png", name], model)
    assert got[0].error == "" and got[1].score is None
    assert got[1].error.startswith("bad_name") and detail in got[1].error


def test_a_served_path_row_with_a_nul_byte_fails_that_row_only(checkpoint, images, tmp_path, monkeypatch):
    import pandas as pd

    from qualiclip.pipeline.serving import QualiCLIPPyfunc
    from qualiclip.scoring import load_scorer

    Image.fromarray(images[0]).save(tmp_path / "good.png")
    served = QualiCLIPPyfunc()
    served.model = load_scorer(checkpoint)
    monkeypatch.setenv("QUALICLIP_SERVE_ROOT", str(tmp_path))
    rows = ["good.png", "bad\x00name.png", "y" * 300, "lone\ud800.png", "good.png"]  # JSON can carry each of them
    answer = served.predict(None, pd.DataFrame({"path": pd.Series(rows, dtype=object)}))
    assert answer.error[0] is None and answer.error[4] is None and 0 <= answer.score[0] <= 1
    assert answer.score[1] is None and answer.error[1].startswith("row 1: bad_name: the name holds a NUL byte")
    assert answer.score[2] is None and answer.error[2].startswith("row 2: bad_name: a component of the path is 300")
    assert answer.score[3] is None and answer.error[3].startswith("row 3: bad_name: the name holds U+D800")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "1e-10", "-1", "1e400", "lots"])
def test_a_max_memory_gb_outside_its_range_is_a_usage_error(checkpoint, images, tmp_path, capsys, value):
    from qualiclip.pipeline.cli import main

    Image.fromarray(images[0]).save(tmp_path / "a.png")
    for command in (
        ["score", str(tmp_path / "a.png"), "--out", str(tmp_path / "s.csv")],
        ["explain", str(tmp_path / "a.png"), "--out", str(tmp_path / "map.png")],
    ):
        with pytest.raises(SystemExit) as stop:
            main([*command, "--model", str(checkpoint), f"--max-memory-gb={value}"])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert "argument --max-memory-gb" in err and "Traceback" not in err and not (tmp_path / "s.csv").exists()


def test_a_memory_budget_is_checked_against_the_device_never_replaced_by_the_default(model, images):
    from qualiclip.scoring import MIN_MEMORY_BUDGET, device_memory, image_problem, inference_copy

    for budget in (0, 0.5, MIN_MEMORY_BUDGET - 1, float("nan"), device_memory(torch.device("cpu")) + 1):
        with pytest.raises(ScoringError, match="--max-memory-gb .* is outside 0.001 GB to"):
            score_arrays(model, images[:1], max_memory=budget)
    problem = image_problem(inference_copy(model), (4000, 4000, 3), MIN_MEMORY_BUDGET)
    assert "above the memory budget of 0.001 GB" in problem and "0.0 GB" not in problem


def test_model_options_refuse_a_budget_outside_the_range_before_any_model_loads():
    from qualiclip.pipeline.score_cli import ModelOptions

    for gb in (float("nan"), float("inf"), 0.0, 1e-12, -2.0):
        with pytest.raises(ScoringError, match="--max-memory-gb must be a number from 0.001"):
            ModelOptions(max_memory_gb=gb)
    assert ModelOptions(max_memory_gb=0.001).max_memory == 1_000_000
