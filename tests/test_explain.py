"""Quality maps: window geometry, and that a locally degraded region gets the lowest patch scores.

The localisation test needs a model whose score means something; a random tiny model's does not,
and training one inside a test would be slow and could fail for reasons that are not about the
map. So it uses a QualiCLIP whose image encoder is a fixed, hand-built sharpness measure (the
contrast-normalised Laplacian energy of the patch) and whose two prompt features are the two
axes of its 2-D feature: the score then rises with sharpness through the model's own
cosine/softmax scoring. What is under test is the map machinery — windowing, batching the
patches, putting each score back where its patch was — not the quality of a trained model.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from qualiclip.explain import QualityMap, quality_map, window_starts
from qualiclip.model import ModelConfig, QualiCLIP, create_model
from qualiclip.pipeline.cli import main
from qualiclip.scoring import score_arrays


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    """See conftest.one_thread."""


class SharpnessEncoder(nn.Module):
    """(N, 3, H, W) -> (N, 2): (Laplacian energy / contrast, 0.5). Blur lowers the first axis."""

    def __init__(self):
        super().__init__()
        self.register_buffer("lap", torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3))

    def forward(self, x):
        grey = x.mean(1, keepdim=True)  # (N, 1, H, W)
        energy = F.conv2d(grey, self.lap).abs().mean((1, 2, 3)) / (grey.std((1, 2, 3)) + 1e-2)
        return torch.stack([energy, torch.full_like(energy, 0.5)], dim=1)


class ImageOnly(nn.Module):
    def __init__(self, visual):
        super().__init__()
        self.visual = visual


@pytest.fixture(scope="module")
def sharpness_model():
    # prompt pair: "good" = axis 0 (sharp), "bad" = axis 1 (constant); scale 5 keeps it unsaturated
    return QualiCLIP(ImageOnly(SharpnessEncoder()), torch.eye(2), ModelConfig(logit_scale=5.0))


def blur_quadrant(image: np.ndarray) -> np.ndarray:
    """The top-left quadrant under the project's heaviest Gaussian blur (level 5, sigma 5)."""
    from qualiclip.distortions import get_distortion

    h, w = image.shape[:2]
    out = image.astype(np.float32) / 255.0
    blur = get_distortion("gaussian_blur")
    quad = out[: h // 2, : w // 2]
    out[: h // 2, : w // 2] = blur.apply(quad, 5, blur.draw(np.random.default_rng(0), w // 2, h // 2))
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def inside(qmap: QualityMap, y0, y1, x0, x1) -> np.ndarray:
    """Mask of the patches lying entirely within rows [y0, y1) and columns [x0, x1)."""
    p = qmap.patch
    return np.array([[y0 <= y and y + p <= y1 and x0 <= x and x + p <= x1 for x in qmap.xs] for y in qmap.ys])


def test_blurred_quadrant_gets_the_lowest_patch_scores(sharpness_model, kodak_dir, tmp_path):
    from qualiclip.explain import render_quality_map
    from qualiclip.imageio import read_image

    pristine = read_image(kodak_dir / "kodim01.png").pixels  # 512x768, texture everywhere
    h, w = pristine.shape[:2]
    degraded = blur_quadrant(pristine)
    qmap = quality_map(sharpness_model, degraded, patch=224, stride=112)
    in_quad = inside(qmap, 0, h // 2, 0, w // 2)
    outside = ~inside(qmap, 0, h // 2, 0, w // 2) & ~_overlaps(qmap, h // 2, w // 2)
    assert in_quad.sum() == 2 and outside.sum() > 10
    assert qmap.scores[in_quad].max() < qmap.scores[outside].min()
    y, x, _ = qmap.worst()
    assert y + qmap.patch <= h // 2 and x + qmap.patch <= w // 2
    # control: on the pristine photo these windows are not the worst, the blur is what is found;
    # and windows that do not touch the quadrant keep their exact scores (the map is local)
    clean = quality_map(sharpness_model, pristine, patch=224, stride=112)
    cy, cx, _ = clean.worst()
    assert not (cy + clean.patch <= h // 2 and cx + clean.patch <= w // 2)
    assert (clean.scores[in_quad] - qmap.scores[in_quad]).min() > 0.5
    np.testing.assert_allclose(clean.scores[outside], qmap.scores[outside], atol=1e-6)
    assert render_quality_map(qmap, degraded, tmp_path / "map.png", stride=112).stat().st_size > 10_000


def _overlaps(qmap: QualityMap, y1: int, x1: int) -> np.ndarray:
    """Patches that touch the top-left region [0, y1) x [0, x1)."""
    return np.array([[y < y1 and x < x1 for x in qmap.xs] for y in qmap.ys])


def test_windows_cover_the_whole_image():
    assert window_starts(768, 224, 112) == [0, 112, 224, 336, 448, 544]
    assert window_starts(224, 224, 112) == [0]
    assert window_starts(300, 224, 224) == [0, 76]
    qmap = QualityMap(np.array([[0.2, 0.4]]), (0,), (0, 2), 4, 0.3)
    np.testing.assert_allclose(qmap.heat(4, 6)[0], [0.2, 0.2, 0.3, 0.3, 0.4, 0.4])


def test_patch_scores_are_the_scores_of_the_crops(sharpness_model):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (100, 90, 3), dtype=np.uint8)
    qmap = quality_map(sharpness_model, image, patch=64, stride=20)
    crops = [image[y : y + 64, x : x + 64] for y in qmap.ys for x in qmap.xs]
    np.testing.assert_allclose(qmap.scores.ravel(), score_arrays(sharpness_model, crops), atol=1e-6)
    assert qmap.global_score == pytest.approx(score_arrays(sharpness_model, [image])[0], abs=1e-6)
    assert quality_map(sharpness_model, image[:50], patch=224).patch == 50  # reduced to the image


def test_explain_cli_writes_map_and_csv(kodak_dir, tmp_path, capsys):
    from qualiclip.checkpoint import save_checkpoint

    ckpt = save_checkpoint(create_model(ModelConfig()), tmp_path / "ckpt")
    image = tmp_path / "small.png"
    Image.open(kodak_dir / "kodim01.png").resize((192, 128)).save(image)
    assert (
        main(
            [
                "explain",
                str(image),
                "--out",
                str(tmp_path / "map.png"),
                "--model",
                str(ckpt),
                "--patch",
                "64",
                "--stride",
                "32",
                "--csv",
                str(tmp_path / "p.csv"),
            ]
        )
        == 0
    )
    assert (tmp_path / "map.png").stat().st_size > 5_000
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 3 * 5 and {r["size"] for r in rows} == {"64"}
    assert "quality" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from qualiclip.checkpoint import save_checkpoint

    return save_checkpoint(create_model(ModelConfig()), tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.mark.parametrize("size", [(1, 1), (100_000, 10)])
def test_images_too_small_for_the_encoder_are_one_line_errors(tiny_checkpoint, tmp_path, capsys, size):
    from qualiclip.pipeline.cli import main

    Image.new("RGB", size, "grey").save(tmp_path / "x.png")
    rc = main(
        [
            "explain",
            str(tmp_path / "x.png"),
            "--out",
            str(tmp_path / "map.png"),
            "--model",
            str(tiny_checkpoint),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and f"too_small: {size[0]}x{size[1]} px" in err and "upscale" in err
    assert not (tmp_path / "map.png").exists()


def test_a_patch_below_the_encoder_minimum_names_the_option(tiny_checkpoint, tmp_path, capsys):
    from qualiclip.pipeline.cli import main

    Image.new("RGB", (96, 64), "grey").save(tmp_path / "x.png")
    args = ["explain", str(tmp_path / "x.png"), "--model", str(tiny_checkpoint), "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "map.png"), "--patch", "16"]) == 2
    assert "--patch 16 is below the 32 px" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert main([*args, "--out", str(tmp_path / "taken")]) == 2
    assert "is a folder" in capsys.readouterr().err
