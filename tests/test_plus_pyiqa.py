"""QualiCLIP+ weights interoperate with pyiqa (issue 24, item 4): pyiqa's ``QualiCLIP+_*.pth``
prompt-learner weights load here, ours export in that layout, and both give the prompt features
pyiqa's own classes compute from the same weights and text tower.

The round trip needs pyiqa, which is never a dependency of this project: install it into a
folder of its own and name that folder in ``QUALICLIP_PYIQA_SITE`` (``.ci/run`` does both). pyiqa
runs in a subprocess with that folder on its path, so its imports cannot disturb this session.
The refusals and our own round trip need no pyiqa and always run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from qualiclip.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from qualiclip.model import ModelConfig, create_model
from qualiclip.pipeline.cli import main
from qualiclip.plus import (
    LEARNER_FILE,
    PYIQA_KEYS,
    PYIQA_PROMPTS,
    PlusError,
    PromptLearner,
    export_pyiqa,
    learner_from_pyiqa,
    pyiqa_state_dict,
)

PYIQA_SITE = os.environ.get("QUALICLIP_PYIQA_SITE", "")
PYIQA_INSTALL = "pip install --target <folder> --no-deps pyiqa==0.1.16 openai-clip==1.0.1"
needs_pyiqa = pytest.mark.skipif(
    not PYIQA_SITE,
    reason=f"pyiqa round trip: run `{PYIQA_INSTALL}` and set QUALICLIP_PYIQA_SITE=<folder> (.ci/run does)",
)

# A small ResNet CLIP that pyiqa's `build_model` rebuilds exactly: it infers the text heads as
# width // 64, so the text tower is 128 wide with 2 heads (the project's tiny models have 64 and 2),
# and uses QuickGELU.
TEST_MODEL = "qualiclip-pyiqa-test-rn"
TEST_CONFIG = {
    "embed_dim": 64,
    "quick_gelu": True,  # OpenAI's CLIP (pyiqa's) uses QuickGELU
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16, "patch_size": None},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}

# Run by the venv's Python with the pyiqa folder first on sys.path. pyiqa's own classes compute
# its side: `QualiCLIP` (model_type 'qualiclip+') with its `PromptLearner`, built offline: the
# CLIP file pyiqa would download is a TorchScript archive holding our random CLIP's tensors under
# OpenAI's key names (what pyiqa's `clip_model.load` reads), and `QualiCLIP.pth` a stand-in with
# the same CLIP weights. Writes pyiqa's own learner file and the prompt features it computes.
PYIQA_SIDE = r"""
import json, sys, types
from pathlib import Path
import packaging, packaging.version  # openai-clip imports pkg_resources, gone from setuptools >= 81
stub = types.ModuleType("pkg_resources"); stub.packaging = packaging; sys.modules.setdefault("pkg_resources", stub)
import torch
import torch.nn.functional as F

work = Path(sys.argv[1])
state = torch.load(work / "clip_state.pt", weights_only=True)
root = torch.nn.Module()
for key, value in state.items():
    *path, leaf = key.split(".")
    mod = root
    for part in path:
        if part not in mod._modules:
            mod.add_module(part, torch.nn.Module())
        mod = mod._modules[part]
    mod.register_buffer(leaf, value.clone())
torch.jit.save(torch.jit.script(root), str(work / "clip.jit.pt"))
stand_in = {"clip_model." + k: v for k, v in state.items()}
stand_in["prompts_features"] = F.normalize(torch.randn(14, state["text_projection"].shape[1]), dim=-1)
torch.save(stand_in, work / "QualiCLIP.pth")

from pyiqa.archs import qualiclip_arch
from pyiqa.archs.arch_util import load_pretrained_network
qualiclip_arch.load_file_from_url = lambda url, *a, **k: str(work / "QualiCLIP.pth")

def build(seed):
    torch.manual_seed(seed)
    return qualiclip_arch.QualiCLIP(model_type="qualiclip+", backbone=str(work / "clip.jit.pt"), pretrained=False).eval()

def features(net):
    with torch.no_grad():
        return F.normalize(net.prompt_learner(net.clip_model[0]).float(), dim=-1)

net = build(7)
with torch.no_grad():  # token buffers unlike the text tower's own embeddings: a file's are used as stored
    net.prompt_learner.token_prefix.add_(0.01 * torch.randn_like(net.prompt_learner.token_prefix))
    net.prompt_learner.token_suffix.add_(0.01 * torch.randn_like(net.prompt_learner.token_suffix))
torch.save({"params": net.state_dict()}, work / "QualiCLIP+_pyiqa.pth")  # as pyiqa's save_network writes
torch.save(features(net), work / "pyiqa_own.pt")
ours = build(8)
load_pretrained_network(ours, str(work / "ours.pth"), True, "params")  # what pyiqa's QualiCLIP+ does
torch.save(features(ours), work / "pyiqa_from_ours.pt")
(work / "pyiqa.json").write_text(json.dumps({"prompts": net.prompt_pairs, "keys": sorted(net.state_dict())}))
"""


@pytest.fixture(scope="module")
def model(one_thread, tmp_path_factory):
    """A seeded random QualiCLIP of the test architecture."""
    config = tmp_path_factory.mktemp("config") / f"{TEST_MODEL}.json"
    config.write_text(json.dumps(TEST_CONFIG))
    open_clip.add_model_config(config)
    return create_model(ModelConfig(name=TEST_MODEL, seed=5)).eval()


def features(learner: PromptLearner) -> torch.Tensor:
    with torch.no_grad():
        return learner.text_features()


@needs_pyiqa
def test_pyiqa_weights_load_and_ours_export_with_pyiqas_prompt_features(model, tmp_path):
    ours = PromptLearner(model.clip, model.cfg.name, seed=11)
    export_pyiqa(ours, tmp_path / "ours.pth")
    torch.save(model.clip.state_dict(), tmp_path / "clip_state.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PYIQA_SITE, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-c", PYIQA_SIDE, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads((tmp_path / "pyiqa.json").read_text())
    assert tuple(info["prompts"]) == PYIQA_PROMPTS  # the learner's rows are pyiqa's, in its order
    assert info["keys"] == sorted(PYIQA_KEYS)
    # ours -> pyiqa: pyiqa's loader takes our file and computes our prompt features
    pyiqa_from_ours = torch.load(tmp_path / "pyiqa_from_ours.pt", weights_only=True)
    torch.testing.assert_close(pyiqa_from_ours, features(ours), atol=1e-5, rtol=0)
    # pyiqa -> ours: its own file, loaded here, gives the prompt features pyiqa computed
    pyiqa_own = torch.load(tmp_path / "pyiqa_own.pt", weights_only=True)
    theirs = learner_from_pyiqa(model, tmp_path / "QualiCLIP+_pyiqa.pth")
    torch.testing.assert_close(features(theirs), pyiqa_own, atol=1e-5, rtol=0)
    assert (pyiqa_own - features(ours)).abs().max() > 1e-2  # two different learners: the check can fail
    # and the checkpoint made from it scores with exactly those prompts
    out = tmp_path / "imported"
    assert (
        main(
            [
                "import-pyiqa",
                "--model",
                str(_saved(model, tmp_path)),
                "--weights",
                str(tmp_path / "QualiCLIP+_pyiqa.pth"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    torch.testing.assert_close(load_checkpoint(out / "checkpoint").prompt_features, pyiqa_own, atol=1e-5, rtol=0)


def _saved(model, folder: Path) -> Path:
    return save_checkpoint(model, folder / "base")


def test_the_commands_round_trip_our_learner_through_pyiqas_layout(model, tmp_path):
    """export-pyiqa writes what import-pyiqa reads back: the same prompt features, and a
    checkpoint whose fixed prompt features are the learner's."""
    learner = PromptLearner(model.clip, model.cfg.name, seed=2)
    first = export_pyiqa(learner, tmp_path / "a.pth")
    state = torch.load(first, weights_only=True)["params"]
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "prompt_learner.ctx": (14, 16, 128),
        "prompt_learner.token_prefix": (14, 1, 128),
        "prompt_learner.token_suffix": (14, 77 - 1 - 16, 128),
    }
    base = _saved(model, tmp_path)
    assert main(["import-pyiqa", "--model", str(base), "--weights", str(first), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / LEARNER_FILE).is_file()
    assert read_metadata(tmp_path / "p" / "checkpoint")["source"] == "pyiqa"
    plus = load_checkpoint(tmp_path / "p" / "checkpoint")
    torch.testing.assert_close(plus.prompt_features, features(learner), atol=1e-5, rtol=0)
    assert main(["export-pyiqa", "--plus", str(tmp_path / "p"), "--out", str(tmp_path / "b.pth")]) == 0
    again = torch.load(tmp_path / "b.pth", weights_only=True)["params"]
    for key in PYIQA_KEYS:
        assert torch.equal(again[key], state[key]), key


def test_pyiqa_weights_of_another_shape_or_kind_are_refused_with_the_fix(model, tmp_path, capsys):
    good = pyiqa_state_dict(PromptLearner(model.clip, model.cfg.name))
    rn50 = {k: torch.zeros(*v.shape[:-1], 512) for k, v in good.items()}  # pyiqa's real RN50 width
    torch.save({"params": rn50}, tmp_path / "rn50.pth")
    with pytest.raises(PlusError, match="text tower needs.*RN50") as err:
        learner_from_pyiqa(model, tmp_path / "rn50.pth")
    assert "\n" not in str(err.value)
    torch.save({"params": {"clip_model.x": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(PlusError, match="not QualiCLIP.pth"):
        learner_from_pyiqa(model, tmp_path / "other.pth")
    short = dict(good, **{"prompt_learner.ctx": good["prompt_learner.ctx"][:, :8]})  # 8 context vectors
    torch.save(short, tmp_path / "short.pth")  # a bare state dict is read too
    with pytest.raises(PlusError, match="shapes"):
        learner_from_pyiqa(model, tmp_path / "short.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(PlusError, match="cannot read"):
        learner_from_pyiqa(model, tmp_path / "text.pth")
    base = _saved(model, tmp_path)
    assert (
        main(
            [
                "import-pyiqa",
                "--model",
                str(base),
                "--weights",
                str(tmp_path / "rn50.pth"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "text tower needs" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    plus_dir = tmp_path / "plus"  # the plus stage's layout, but its learner file missing, then damaged
    save_checkpoint(model, plus_dir / "checkpoint")
    assert main(["export-pyiqa", "--plus", str(plus_dir), "--out", str(tmp_path / "x.pth")]) == 2
    assert LEARNER_FILE in capsys.readouterr().err
    (plus_dir / LEARNER_FILE).write_bytes(b"damaged")
    assert main(["export-pyiqa", "--plus", str(plus_dir), "--out", str(tmp_path / "x.pth")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()


def test_a_file_that_would_run_code_is_not_unpickled(model, tmp_path):
    """torch.load(weights_only=True): a pickle of anything but tensors and plain containers is refused."""
    torch.save({"params": {"prompt_learner.ctx": Path("/")}}, tmp_path / "evil.pth")
    with pytest.raises(PlusError, match="cannot read"):
        learner_from_pyiqa(model, tmp_path / "evil.pth")


def test_shared_context_files_are_expanded_per_prompt(model, tmp_path):
    """pyiqa's prompt_specific_ctx=False stores one (n_ctx, W) context for every prompt."""
    good = pyiqa_state_dict(PromptLearner(model.clip, model.cfg.name, seed=4))
    shared = dict(good, **{"prompt_learner.ctx": good["prompt_learner.ctx"][0]})
    torch.save({"params": shared}, tmp_path / "shared.pth")
    learner = learner_from_pyiqa(model, tmp_path / "shared.pth")
    assert all(torch.equal(learner.ctx[i], good["prompt_learner.ctx"][0]) for i in range(len(PYIQA_PROMPTS)))
