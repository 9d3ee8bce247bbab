"""The scoring encoder (`FastEncoder`) and its ONNX export give the model's own scores on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_scoring import discriminative, randomise_batchnorm

from qualiclip.fast_encoder import FastEncoder
from qualiclip.model import ModelConfig, create_model
from qualiclip.scoring import inference_copy, score_arrays


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    """See conftest.one_thread."""


@pytest.fixture(scope="module")
def photos(kodak_dir, bsds_dir, clive_dir) -> list[np.ndarray]:
    """Real photos of several sizes and aspect ratios, odd sides included (uint8 RGB)."""

    def load(path):
        return np.array(Image.open(path).convert("RGB"))

    kodak = load(sorted(kodak_dir.glob("*.png"))[4])  # 768x512
    bsds = load(sorted(p for p in bsds_dir.iterdir() if p.suffix == ".jpg")[0])  # 481x321 or 321x481
    clive = load(sorted((clive_dir / "images").iterdir())[0])  # 500x500
    return [kodak, bsds, clive, np.ascontiguousarray(kodak[37:134, 201:332]), np.ascontiguousarray(bsds[:64, :200])]


def reference_scores(model, images) -> np.ndarray:
    """The model's own forward pass (open_clip modules, BatchNorm unfolded) on float [0, 1] input."""
    with torch.no_grad():
        return np.array([model(torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255).item() for im in images])


@pytest.mark.shared_data
@pytest.mark.parametrize("pos_embedding", ["drop", "interpolate"])
def test_fast_encoder_gives_the_model_scores_on_photos(photos, pos_embedding):
    model = discriminative(randomise_batchnorm(create_model(ModelConfig(pos_embedding=pos_embedding)).eval()), photos)
    ref = reference_scores(model, photos)
    assert np.ptp(ref) > 0.1  # the scores really differ between photos
    scorer = inference_copy(model)
    assert isinstance(scorer.visual, FastEncoder)
    np.testing.assert_allclose(score_arrays(scorer, photos), ref, atol=1e-5)  # uint8 in: normalisation folded
    as_float = [im.astype(np.float32) / 255 for im in photos]
    np.testing.assert_allclose(score_arrays(scorer, as_float), ref, atol=1e-5)  # float [0, 1] in
    scorer.visual.portable = True  # the plain-torch graph (GPU, export)
    np.testing.assert_allclose(score_arrays(scorer, photos), ref, atol=1e-5)


@pytest.mark.shared_data
def test_bf16_autocast_runs_the_encoder_in_bf16(photos):
    model = discriminative(randomise_batchnorm(create_model(ModelConfig()).eval()), photos)
    scorer = inference_copy(model)
    fp32 = score_arrays(scorer, photos[:3])
    bf16 = score_arrays(scorer, photos[:3], precision="bf16")
    assert not np.array_equal(fp32, bf16) and np.abs(fp32 - bf16).max() < 0.05
    assert any(w.dtype == torch.bfloat16 for m in scorer.visual.modules() for w, _ in getattr(m, "_cast", {}).values())


@pytest.mark.shared_data
@pytest.mark.slow
def test_onnx_export_scores_like_torch_in_onnxruntime(photos, tmp_path, capsys):
    """`qualiclip export-onnx`, then onnxruntime alone: same scores on photos of several sizes."""
    import onnxruntime as ort

    from qualiclip.checkpoint import save_checkpoint
    from qualiclip.pipeline.cli import main

    model = discriminative(randomise_batchnorm(create_model(ModelConfig()).eval()), photos)
    checkpoint = save_checkpoint(model, tmp_path / "checkpoint")
    out = tmp_path / "model.onnx"
    assert main(["export-onnx", "--model", str(checkpoint), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ref = score_arrays(model, photos)
    got = [session.run(["score"], {"image": im[None]})[0][0] for im in photos]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    pair = np.stack([photos[0], photos[0][::-1]])  # a batch of two
    score, probs = session.run(None, {"image": pair})
    np.testing.assert_allclose(score, score_arrays(model, list(pair)), atol=1e-5)
    np.testing.assert_allclose(score, probs.mean(axis=1))
    assert main(["export-onnx", "--model", str(checkpoint), "--out", str(tmp_path / "model.pt")]) == 2
