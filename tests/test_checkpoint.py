"""Checkpoint folders, the official QualiCLIP format, and the resumable train-state file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qualiclip.checkpoint import (
    CONFIG,
    TRAIN_STATE,
    WEIGHTS,
    export_official,
    load_checkpoint,
    load_train_state,
    read_metadata,
    save_checkpoint,
    save_train_state,
)
from qualiclip.model import ModelConfig, ModelLoadError, create_model
from qualiclip.prompts import CLIP_MEAN, CLIP_STD


@pytest.fixture(scope="module")
def tiny():
    return create_model(ModelConfig(seed=3)).eval()


def scores(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_folder_round_trip_keeps_scores_and_metadata(tiny, tmp_path):
    out = save_checkpoint(tiny, tmp_path / "ckpt", {"step": 7, "params_hash": "abc"})
    x = torch.rand(2, 3, 64, 72)
    assert torch.equal(scores(load_checkpoint(out), x), scores(tiny, x))
    assert read_metadata(out) == {"step": 7, "params_hash": "abc"}
    assert not list(tmp_path.glob(".ckpt*"))  # no temporary folder left behind


def test_loading_a_checkpoint_says_nothing_about_random_weights(tiny, tmp_path, caplog):
    """open_clip warns "Model initialized randomly" for the empty model the stored weights fill next:
    silenced there (both readers, and a weights file as ``pretrained``), and for the random init that
    ``pretrained: null`` asks for (the default; issue 23: evaluate's baseline of a from-scratch model
    warned on every run, a warning no one can act on)."""
    from safetensors.torch import save_file

    from qualiclip.checkpoint import load_image_encoder

    out = save_checkpoint(tiny, tmp_path / "ckpt")
    save_file({k: v.contiguous() for k, v in tiny.clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    with caplog.at_level("WARNING"):
        load_checkpoint(out)
        load_image_encoder(out)
        create_model(ModelConfig(pretrained=str(tmp_path / "clip.safetensors")))
    assert "initialized randomly" not in caplog.text
    with caplog.at_level("WARNING"):
        create_model(ModelConfig(seed=4))
    assert "initialized randomly" not in caplog.text


def test_folder_of_another_architecture_is_a_clear_error(tiny, tmp_path):
    out = save_checkpoint(tiny, tmp_path / "ckpt")
    config = json.loads((out / CONFIG).read_text())
    config["model"]["name"] = "RN50"
    (out / CONFIG).write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="do not match architecture 'RN50'"):
        load_checkpoint(out)


def test_missing_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match="run the train stage"):
        load_checkpoint(tmp_path / "nothing")


def test_export_official_round_trip(tiny, tmp_path):
    path = export_official(tiny, tmp_path / "qualiclip.pth")
    state = torch.load(path, weights_only=True)
    assert "prompts_features" in state and all(k.startswith("clip_model.") for k in state if k != "prompts_features")
    x = torch.rand(2, 3, 48, 64)
    assert torch.allclose(scores(load_checkpoint(path, name="qualiclip-tiny-rn"), x), scores(tiny, x), atol=1e-6)


def official_reference_scores(clip_state: dict, prompts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The official formula, independently of qualiclip.model: open_clip's own RN50 forward with the
    attention-pool positional embedding zeroed (= dropped at 224 px), 100·cosine, softmax per pair,
    mean over pairs."""
    import open_clip

    ref = open_clip.create_model("RN50", pretrained=None)
    ref.load_state_dict(clip_state)
    ref.visual.attnpool.positional_embedding.data.zero_()
    ref.eval()
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        f = F.normalize(ref.encode_image((x - mean) / std), dim=-1)  # (N, 1024)
    logits = 100.0 * (f @ F.normalize(prompts, dim=-1).T).view(len(x), -1, 2)  # (N, 7, 2)
    return torch.softmax(logits, dim=-1)[..., 0].mean(dim=-1)


@pytest.mark.slow
def test_official_rn50_file_gives_the_official_scores(tmp_path):
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.create_model("RN50", pretrained=None)
    prompts = F.normalize(torch.randn(14, 1024), dim=-1)
    state = {f"clip_model.{k}": v for k, v in clip.state_dict().items()}
    state["prompts_features"] = prompts
    path = tmp_path / "QualiCLIP.pth"
    torch.save(state, path)

    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    expected = official_reference_scores(clip.state_dict(), prompts, x)
    assert expected.std() > 0 or expected.sub(0.5).abs().max() > 1e-3  # not a degenerate 0.5 everywhere
    by_loader = scores(load_checkpoint(path), x)
    by_config = scores(create_model(ModelConfig(name="RN50", pretrained=str(path))), x)
    assert torch.allclose(by_loader, expected.double(), atol=1e-5, rtol=0)
    assert torch.allclose(by_config, expected.double(), atol=1e-5, rtol=0)


def test_train_state_round_trip_is_weights_only(tmp_path):
    state = {"step": 3, "t": torch.arange(4), "rng": (1, (2, 3), None), "log": [{"step": 1, "loss": 0.5}]}
    path = save_train_state(state, tmp_path / TRAIN_STATE)
    loaded = load_train_state(path)
    assert loaded["step"] == 3 and torch.equal(loaded["t"], state["t"]) and loaded["log"] == state["log"]
    assert [p.name for p in tmp_path.iterdir()] == [TRAIN_STATE]  # the temporary file was renamed
    assert load_train_state(tmp_path / "absent.pt") is None


def test_train_state_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / TRAIN_STATE
    torch.save({"cfg": ModelConfig()}, path)  # what weights_only must never unpickle
    with pytest.raises(ModelLoadError, match="delete it.*train.resume: false"):
        load_train_state(path)


def test_torn_train_state_is_a_clear_error(tmp_path):
    path = tmp_path / TRAIN_STATE
    path.write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(ModelLoadError, match="unreadable"):
        load_train_state(path)


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints (issue 19): refused with one line, before anything is allocated or built


def _random_weights(ckpt):
    (ckpt / WEIGHTS).write_bytes(np.random.default_rng(0).bytes(4096))


def _huge_header_length(ckpt):
    data = (ckpt / WEIGHTS).read_bytes()
    (ckpt / WEIGHTS).write_bytes(b"\xff" * 7 + b"\x7f" + data[8:])


def _truncated_config(ckpt):
    text = (ckpt / CONFIG).read_text()
    (ckpt / CONFIG).write_text(text[: len(text) // 2])


def _huge_architecture(ckpt):
    config = json.loads((ckpt / CONFIG).read_text())
    config["model"]["name"] = "qualiclip-huge-rn"
    config["open_clip_config"]["vision_cfg"]["width"] = 10**9  # an RN stem of 10^9 channels
    (ckpt / CONFIG).write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("damage", "file", "message"),
    [
        (_random_weights, WEIGHTS, "not a valid safetensors file"),
        (_huge_header_length, WEIGHTS, "header length 9223372036854775807 does not fit"),
        (_truncated_config, CONFIG, "is not valid JSON"),
        (_huge_architecture, CONFIG, "vision_cfg.width = 1000000000, above the limit"),
    ],
)
def test_damaged_checkpoints_are_refused_with_one_line(tiny, tmp_path, capsys, damage, file, message):
    from PIL import Image

    from qualiclip.pipeline.cli import main
    from qualiclip.scoring import load_scorer

    ckpt = save_checkpoint(tiny, tmp_path / "ckpt")
    damage(ckpt)
    for load in (load_checkpoint, load_scorer):
        with pytest.raises(ModelLoadError, match=message) as info:
            load(ckpt)
        assert str(ckpt / file) in str(info.value)
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    assert main(["score", str(tmp_path / "a.png"), "--model", str(ckpt), "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert message.split()[0] in err and err.count("\n") == 1 and "Traceback" not in err


def test_an_architecture_within_each_limit_but_too_many_parameters_is_refused(tiny, tmp_path):
    ckpt = save_checkpoint(tiny, tmp_path / "ckpt")
    config = json.loads((ckpt / CONFIG).read_text())
    config["model"]["name"] = "qualiclip-wide-rn"
    # a 4M x 8192 token embedding: 33 B parameters, counted on the meta device. (Built for real it
    # is one 131 GB tensor, which fails at once rather than filling the memory piece by piece.)
    config["open_clip_config"]["text_cfg"].update(width=8192, vocab_size=4_000_000)
    (ckpt / CONFIG).write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"qualiclip-wide-rn' has [\d,]+ parameters, above the limit"):
        load_checkpoint(ckpt)


# ---------------------------------------------------------------------------------------------
# The text tower's activation: OpenAI's CLIPs were trained with QuickGELU; open_clip's plain RN50
# config builds GELU (and only warns for a tag), which changes every prompt feature computed on it


def test_weights_trained_with_quick_gelu_are_built_with_it():
    from qualiclip.model import uses_quick_gelu

    assert uses_quick_gelu("RN50", "openai")  # the tag's own config says so
    assert uses_quick_gelu("RN50", "/weights/RN50.pt")  # a file: every RN50 tag is a QuickGELU one
    assert uses_quick_gelu("RN50", "/weights/QualiCLIP.pth")
    assert not uses_quick_gelu("RN50", None)  # from scratch: the config's own activation
    assert not uses_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")
    assert not uses_quick_gelu("ViT-B-32", "/weights/vit.pt")  # its tags disagree: the config decides
    assert not uses_quick_gelu("qualiclip-tiny-rn", "/weights/tiny.pt")


def test_an_rn50_from_a_weights_file_keeps_quick_gelu_through_its_checkpoint(tmp_path):
    import open_clip

    def activations(model):
        return {type(m).__name__ for m in model.clip.transformer.modules() if "GELU" in type(m).__name__}

    weights = tmp_path / "RN50.pt"  # open_clip's random RN50 stands in for OpenAI's file
    torch.save(open_clip.create_model("RN50", pretrained=None, force_quick_gelu=True).state_dict(), weights)
    model = create_model(ModelConfig(name="RN50", pretrained=str(weights)))
    assert activations(model) == {"QuickGELU"}
    save_checkpoint(model, tmp_path / "ckpt")
    reloaded = load_checkpoint(tmp_path / "ckpt")
    assert activations(reloaded) == {"QuickGELU"}
    tokens = open_clip.tokenize(["Good photo.", "Bad photo."])
    with torch.no_grad():
        assert torch.equal(reloaded.clip.encode_text(tokens), model.clip.encode_text(tokens))
