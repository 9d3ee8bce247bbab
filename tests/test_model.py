"""The model: scores at any size, what trains, the score formula, load errors that name the fix."""

from __future__ import annotations

import time
import unittest.mock

import numpy as np
import pytest
import torch

from qualiclip.model import ModelConfig, ModelLoadError, create_model, hub_reachable


@pytest.fixture(scope="module")
def tiny():
    return create_model(ModelConfig()).eval()


@pytest.mark.parametrize("size", [(64, 64), (224, 224), (96, 64), (64, 150), (40, 33), (33, 40), (32, 32)])
def test_scores_any_size(tiny, size):
    x = torch.rand(3, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q = tiny(x)
        sims = tiny.similarities(x)
    assert q.shape == (3,) and sims.shape == (3, 7, 2)
    assert torch.isfinite(q).all() and ((q >= 0) & (q <= 1)).all()
    assert (sims.abs() <= 1 + 1e-5).all()


def test_every_shipped_config_builds_and_scores_non_square():
    from qualiclip.model import MODEL_CONFIG_DIR

    names = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
    assert {"qualiclip-tiny-rn", "qualiclip-small-rn"} <= set(names)
    for name in names:
        model = create_model(ModelConfig(name=name)).eval()
        with torch.no_grad():
            q = model(torch.rand(2, 3, 96, 160, generator=torch.Generator().manual_seed(0)))
        assert q.shape == (2,) and ((q >= 0) & (q <= 1)).all(), name


def test_too_small_image_names_the_minimum(tiny):
    with pytest.raises(ValueError, match="at least 32 px.*upscale"):
        tiny(torch.rand(1, 3, 17, 23))


def test_saturated_scores_stay_distinct_and_ordered(tiny):
    """Cosine gaps of 0.2 / 0.25 / 0.3 (logits 20-30) round to exactly 1.0 in float32; the score
    keeps them apart, so rankings of a confident model have no artificial ties."""
    gaps = torch.tensor([0.2, 0.25, 0.3])
    sims = torch.stack([gaps, torch.zeros(3)], dim=-1)[:, None, :].expand(3, 7, 2)
    assert (torch.softmax(100 * sims, dim=-1)[..., 0] == 1).all()  # what float32 would give
    q = tiny.score_from_similarities(sims)
    assert q.dtype == torch.float64 and q[0] < q[1] < q[2] < 1
    np.testing.assert_allclose(1 - q.numpy(), 1 / (1 + np.exp(100 * gaps.double().numpy())), rtol=1e-6, atol=1e-15)


def test_interpolated_positional_embedding_works_non_square():
    model = create_model(ModelConfig(pos_embedding="interpolate")).eval()
    with torch.no_grad():
        q = model(torch.rand(2, 3, 40, 97))
    assert q.shape == (2,) and torch.isfinite(q).all()
    assert model.visual.attnpool.positional_embedding.requires_grad  # used, so trained


def test_score_is_the_documented_formula(tiny):
    x = torch.rand(2, 3, 64, 80)
    with torch.no_grad():
        sims = tiny.similarities(x)  # (N, K, 2)
        expected = torch.softmax(100.0 * sims, dim=-1)[..., 0].mean(-1)
        assert torch.allclose(tiny(x), expected.double(), atol=1e-6)


def test_eval_score_does_not_depend_on_the_batch(tiny):
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        together = tiny(x)
        alone = torch.cat([tiny(x[i : i + 1]) for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_only_the_image_encoder_trains(tiny):
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("clip.visual.") for n in trainable)
    assert "clip.visual.attnpool.positional_embedding" not in trainable  # dropped, so frozen
    assert not tiny.prompt_features.requires_grad
    assert torch.allclose(tiny.prompt_features.norm(dim=-1), torch.ones(14))


def test_unknown_model_suggests_close_names():
    with pytest.raises(ModelLoadError, match="did you mean.*RN50"):
        create_model(ModelConfig(name="RN5O"))


def test_unknown_pretrained_tag_lists_available():
    with pytest.raises(ModelLoadError, match="no pretrained tag 'nope'.*openai"):
        create_model(ModelConfig(name="RN50", pretrained="nope"))


def _fails_fast(hub_offline: bool) -> str:
    import huggingface_hub.constants

    start = time.perf_counter()
    with unittest.mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", hub_offline):
        with pytest.raises(ModelLoadError) as info:
            create_model(ModelConfig(name="RN50", pretrained="openai"))
    assert time.perf_counter() - start < 15
    return str(info.value)


def test_offline_openai_fails_fast_naming_the_fix():
    msg = _fails_fast(hub_offline=True)
    assert "model.pretrained" in msg and ".safetensors" in msg and "internet" in msg


def test_unreachable_hub_fails_fast_without_the_offline_flag():
    if hub_reachable(timeout=2.0):
        pytest.skip("the model hub is reachable here; this test is about machines without internet")
    assert "model.pretrained" in _fails_fast(hub_offline=False)


def test_weights_of_another_architecture_give_a_clear_error(tmp_path):
    clip = create_model(ModelConfig()).clip
    path = tmp_path / "tiny.pt"
    torch.save(clip.state_dict(), path)
    with pytest.raises(ModelLoadError, match="do not match architecture 'RN50'.*model.name"):
        create_model(ModelConfig(name="RN50", pretrained=str(path)))


def test_missing_weights_file_names_the_param(tmp_path):
    with pytest.raises(ModelLoadError, match="not found.*model.pretrained"):
        create_model(ModelConfig(pretrained=str(tmp_path / "absent.safetensors")))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"obj": ModelConfig()}, path)  # a pickled class instance, not a tensor dict
    with pytest.raises(ModelLoadError, match="weights_only"):
        create_model(ModelConfig(pretrained=str(path)))


def test_prompt_features_of_wrong_width_are_refused(tmp_path):
    clip = create_model(ModelConfig()).clip
    state = {f"clip_model.{k}": v for k, v in clip.state_dict().items()}
    state["prompts_features"] = torch.randn(14, 1024)  # RN50's width in a tiny model's file
    path = tmp_path / "bad_prompts.pth"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match=r"prompt features of shape \(14, 1024\)"):
        create_model(ModelConfig(pretrained=str(path)))
