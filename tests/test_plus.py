"""QualiCLIP+ (issue 24): the prompt learner, training on MOS, the refusal of bad labels, and the
exported checkpoint that scores like the learner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qualiclip.checkpoint import load_checkpoint, read_metadata
from qualiclip.datasets import IQADataset
from qualiclip.datasets.base import IQAItem
from qualiclip.errors import QualiclipError
from qualiclip.metrics import correlations
from qualiclip.model import ModelConfig, create_model, encode_prompts
from qualiclip.plus import (
    CTX_STD,
    N_CTX,
    PlusError,
    PromptLearner,
    full_image_features,
    load_labelled,
    make_splits,
    plcc_loss,
    plus_model,
    save_plus,
    score_features,
    train_plus,
    training_crops,
)
from qualiclip.prompts import PROMPT_PAIRS
from qualiclip.schema import EvaluateConfig, PlusConfig


@pytest.fixture(scope="module")
def tiny(one_thread):
    return create_model(ModelConfig()).eval()


def labelled_set(folder: Path, source: Path, n: int, mos=None) -> dict:
    """A generic ``image,mos`` CSV set of ``n`` CLIVE-dev photos in ``folder``; its plus.dataset entry."""
    rows = (source / "labels.csv").read_text().splitlines()[1 : n + 1]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = ["image,mos"]
    for k, row in enumerate(rows):
        name, value = row.split(",")[:2]
        shutil.copy(source / "images" / name, folder / "images" / name)
        lines.append(f"{name},{value if mos is None else mos(k)}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return {"name": "csv", "root": str(folder), "image_dir": "images", "mos_range": [0, 100], "lower_is_better": False}


def test_the_learner_has_16_context_vectors_per_prompt_around_its_tokens(tiny):
    learner = PromptLearner(tiny.clip, tiny.cfg.name, seed=3)
    width = tiny.clip.token_embedding.weight.shape[1]
    assert learner.ctx.shape == (2 * len(PROMPT_PAIRS), N_CTX, width)
    assert [n for n, p in learner.named_parameters() if p.requires_grad] == ["ctx"]
    assert not any(p.requires_grad for p in tiny.clip.parameters())  # the CLIP is frozen
    assert abs(float(learner.ctx.detach().std()) - CTX_STD) < 0.002 and abs(float(learner.ctx.detach().mean())) < 0.002
    emb = learner.embeddings()
    assert emb.shape == learner.token_embeds.shape
    for i in range(emb.shape[0]):
        e = int(learner.eot[i])
        assert torch.equal(emb[i, 0], learner.token_embeds[i, 0])  # start of text
        assert torch.equal(emb[i, 1:9], learner.ctx[i, :8])  # 8 context tokens
        assert torch.equal(emb[i, 9 : 9 + e - 1], learner.token_embeds[i, 1:e])  # the prompt's tokens
        assert torch.equal(emb[i, 8 + e : 16 + e], learner.ctx[i, 8:])  # 8 context tokens
        assert torch.equal(emb[i, 16 + e], learner.token_embeds[i, e])  # end of text, where features are read
    assert torch.equal(PromptLearner(tiny.clip, tiny.cfg.name, seed=3).ctx, learner.ctx)  # seeded


def test_without_context_the_learner_gives_the_fixed_prompt_features(tiny):
    """The text path is open_clip's encode_text: with no context spliced in, the features are QualiCLIP's."""
    learner = PromptLearner(tiny.clip, tiny.cfg.name, n_ctx=0)
    with torch.no_grad():
        got = learner.text_features()
    torch.testing.assert_close(got, encode_prompts(tiny.clip, tiny.cfg.name), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, tiny.prompt_features, atol=1e-5, rtol=0)


def test_the_score_is_qualiclips_formula(tiny):
    feats = torch.nn.functional.normalize(torch.randn(5, tiny.prompt_features.shape[1]), dim=-1)
    text = tiny.prompt_features
    got = score_features(feats, text, 100.0)
    sims = feats @ text.T  # by hand: per pair, exp(s·c+) / (exp(s·c+) + exp(s·c−)), averaged
    pos, neg = sims[:, 0::2], sims[:, 1::2]
    by_hand = (1 / (1 + torch.exp(100.0 * (neg - pos)))).mean(dim=1)
    torch.testing.assert_close(got, by_hand, atol=1e-6, rtol=0)
    expected = tiny.score_from_similarities((feats @ text.T).view(5, -1, 2)).float()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    y = torch.tensor([0.1, 0.5, 0.9])
    assert float(plcc_loss(y, y)) < 1e-6 and abs(float(plcc_loss(-y, y)) - 1) < 1e-6


def test_random_splits_are_70_10_20_seeded_and_official_ones_are_kept(tmp_path, clive_dir):
    spec = labelled_set(tmp_path / "set", clive_dir, 20)
    ds = load_labelled(spec)
    splits = make_splits(ds, 123)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [14, 2, 4]
    assert sorted(sum(splits.values(), [])) == list(range(20))
    assert make_splits(ds, 123) == splits and make_splits(ds, 124) != splits
    labels = tmp_path / "set/labels.csv"
    lines = labels.read_text().splitlines()
    split = ["train"] * 12 + ["test"] * 8
    labels.write_text("\n".join([lines[0] + ",split"] + [f"{r},{s}" for r, s in zip(lines[1:], split)]) + "\n")
    official = make_splits(load_labelled(spec), 1)
    assert official == {"train": list(range(12)), "val": [], "test": list(range(12, 20))}


@pytest.mark.parametrize(
    "case, fix",
    [
        ("missing", "missing image"),
        ("non-numeric", "is not a number"),
        ("constant", "nothing to learn"),
        ("small", "fewer than plus.batch_size 8 — add rated images or lower plus.batch_size"),
    ],
)
def test_bad_labelled_data_is_refused_before_training_with_the_fix(tmp_path, clive_dir, tiny, case, fix):
    spec = labelled_set(tmp_path / "set", clive_dir, 10 if case == "small" else 16)
    labels = tmp_path / "set/labels.csv"
    lines = labels.read_text().splitlines()
    if case == "missing":
        (tmp_path / "set/images" / lines[3].split(",")[0]).unlink()
    elif case == "non-numeric":
        lines[2] = lines[2].split(",")[0] + ",good"
    elif case == "constant":
        lines[1:] = [line.split(",")[0] + ",50" for line in lines[1:]]
    labels.write_text("\n".join(lines) + "\n")
    trained = []
    with pytest.raises(QualiclipError) as err:
        train_plus(tiny, load_labelled(spec), PlusConfig(epochs=1), on_epoch=trained.append)
    assert isinstance(err.value, PlusError) and fix in str(err.value) and "\n" not in str(err.value)
    assert trained == []


def test_training_on_a_tiny_labelled_set_fits_it_and_the_checkpoint_scores_as_the_learner(tmp_path, clive_dir, tiny):
    ds = load_labelled(labelled_set(tmp_path / "set", clive_dir, 24))
    # lr below the paper's 2e-3: a random tiny model's image features barely differ (their spread
    # is ~0.01), and at 2e-3 the prompts overshoot into saturated softmaxes that pass no gradient
    cfg = PlusConfig(epochs=40, batch_size=8, crop=96, cached_crops=2, device="cpu", seed=5, lr=2e-4)
    result = train_plus(tiny, ds, cfg)
    train = result.splits["train"]
    feats = full_image_features(tiny, ds, train, torch.device("cpu"))
    mos = ds.mos()[train]
    before = tiny.score_from_similarities((feats @ tiny.prompt_features.T).view(len(train), -1, 2)).numpy()
    after = result.model.score_from_similarities(
        (feats @ result.model.prompt_features.T).view(len(train), -1, 2)
    ).numpy()
    srcc_before, srcc_after = correlations(before, mos)["srcc"], correlations(after, mos)["srcc"]
    assert srcc_after > srcc_before + 0.2 and srcc_after > 0.4, (srcc_before, srcc_after)
    losses = [row["loss"] for row in result.log]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert set(result.metrics) == {"plus", "base"} and result.metrics["plus"]["n"] == len(result.splits["test"])
    assert torch.equal(tiny.prompt_features, create_model(ModelConfig()).prompt_features)  # the base is unchanged

    checkpoint = save_plus(result, ds, tmp_path / "out")
    loaded = load_checkpoint(checkpoint).eval()
    x = torch.rand(3, 3, 96, 128)
    with torch.no_grad():
        exported = loaded(x)
        in_memory = score_features(tiny.encode(x), result.learner.text_features(), tiny.cfg.logit_scale)
    torch.testing.assert_close(exported.float(), in_memory, atol=1e-5, rtol=0)
    meta = read_metadata(checkpoint)
    assert meta["variant"] == "qualiclip+" and len(meta["splits"]["train"]["digest"]) == 64


@pytest.mark.parametrize("cached_crops", [2, 0])
def test_the_same_seed_learns_the_same_prompts_with_or_without_the_cache(tmp_path, clive_dir, tiny, cached_crops):
    ds = load_labelled(labelled_set(tmp_path / "set", clive_dir, 12))
    cfg = PlusConfig(epochs=2, batch_size=4, crop=64, cached_crops=cached_crops, device="cpu", seed=9, lr=2e-4)
    first, second = train_plus(tiny, ds, cfg), train_plus(tiny, ds, cfg)
    assert torch.equal(first.learner.ctx, second.learner.ctx)
    assert torch.equal(first.model.prompt_features, second.model.prompt_features)
    assert [r["loss"] for r in first.log] == [r["loss"] for r in second.log]
    other = train_plus(tiny, ds, PlusConfig(**{**cfg.__dict__, "seed": 10}))
    assert not torch.equal(first.learner.ctx, other.learner.ctx)


def gradient_photo(path: Path, height: int, width: int) -> Path:
    """A photo whose value encodes the row (0 at the top, 255 at the bottom): a crop's value span
    tells how much of the photo's height it covers, so at what scale it was cut."""
    rows = np.round(np.linspace(0, 255, height)).astype(np.uint8)
    Image.fromarray(np.repeat(np.repeat(rows[:, None, None], width, axis=1), 3, axis=2)).save(path)
    return path


@pytest.mark.parametrize("name, resized", [("flive", True), ("csv", False)])
def test_flive_crops_are_cut_after_a_random_aspect_preserving_resize_to_384_416(tmp_path, name, resized):
    """pyiqa's FLIVE recipe: shorter side to a random size in [384, 416] for every crop, then the
    384 crop; other sets keep their size (this 600 x 900 photo: a crop covers 384/600 of its height)."""
    photo = gradient_photo(tmp_path / "p.png", 600, 900)
    ds = IQADataset(name, tmp_path, (IQAItem(photo, 50.0),), (0.0, 100.0), False)
    crops = training_crops(ds, 0, 384, 12, np.random.default_rng(0))
    assert crops.shape == (12, 3, 384, 384)
    spans = [(float(c[0, -1, 0]) - float(c[0, 0, 0])) for c in crops]  # of the height's [0, 1] range
    if resized:  # covers 384 / s of the height, s in [384, 416]: from 0.92 to all of it
        assert all(0.9 <= s <= 1.0 for s in spans), spans
        assert len({round(s, 3) for s in spans}) > 3  # a size drawn per crop
    else:
        assert all(abs(s - 383 / 599) < 0.01 for s in spans), spans
    again = training_crops(ds, 0, 384, 12, np.random.default_rng(0))
    assert torch.equal(crops, again)  # seeded


@pytest.fixture
def plus_eval_params(tmp_path, clive_dir):
    spec = labelled_set(tmp_path / "set", clive_dir, 20)
    other = {**labelled_set(tmp_path / "other", clive_dir, 6), "label": "mine"}
    return {
        "plus": PlusConfig(dataset=spec, seed=123),
        "evaluate": EvaluateConfig(datasets=(other,), batch_size=4, device="cpu"),
    }


def test_the_plus_model_is_evaluated_on_its_test_split_and_each_evaluate_dataset_beside_its_start(
    tmp_path, tiny, plus_eval_params
):
    """The evaluate stage's code (per-image scores, dataset blocks), the model it starts from as the
    baseline on the same images; a block per set: `test` and every evaluate.datasets label."""
    from qualiclip.pipeline.stages import evaluate_plus, plus_eval_sets, plus_summary
    from qualiclip.scoring import score_paths

    ds = load_labelled(plus_eval_params["plus"].dataset)
    sets = plus_eval_sets(plus_eval_params, ds)
    assert [label for label, _ in sets] == ["test", "mine"]
    plus = plus_model(tiny, PromptLearner(tiny.clip, tiny.cfg.name, seed=1))
    evaluate_plus(plus_eval_params, sets, plus, tmp_path / "eval", start=tiny)
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert set(metrics) == {"test", "mine", "baseline"} and set(metrics["baseline"]) == {"test", "mine"}
    test = make_splits(ds, 123)["test"]
    paths, mos = [ds.items[i].path for i in test], ds.mos()[test]
    assert metrics["test"]["n"] == metrics["baseline"]["test"]["n"] == len(test) == 4 and metrics["mine"]["n"] == 6
    for model, block in ((plus, metrics["test"]), (tiny, metrics["baseline"]["test"])):
        scores = np.array([r.score for r in score_paths(paths, model, batch_size=4)])
        assert block["srcc"] == pytest.approx(correlations(scores, mos)["srcc"], abs=1e-9)
        assert block["plcc"] == pytest.approx(correlations(scores, mos)["plcc"], abs=1e-6)
    assert metrics["test"]["plcc"] != metrics["baseline"]["test"]["plcc"]  # two models
    rows = (tmp_path / "eval/scores_test.csv").read_text().splitlines()
    assert rows[0] == "path,mos,split,score,baseline_score" and [r.split(",")[0] for r in rows[1:]] == [
        str(p) for p in paths
    ]
    line = plus_summary(metrics)
    t, b = metrics["test"], metrics["baseline"]["test"]
    assert line.startswith(
        f"test SRCC {t['srcc']:.3f} PLCC {t['plcc']:.3f} (from {b['srcc']:.3f}, {b['plcc']:.3f}); mine"
    )


def test_an_evaluate_dataset_named_like_the_test_split_is_refused(tmp_path, plus_eval_params):
    from qualiclip.pipeline.stages import plus_eval_sets

    ev = plus_eval_params["evaluate"]
    params = {**plus_eval_params, "evaluate": EvaluateConfig(datasets=({**ev.datasets[0], "label": "test"},))}
    with pytest.raises(PlusError, match="labelled 'test', the plus stage's name for its test split — give that entry"):
        plus_eval_sets(params, load_labelled(params["plus"].dataset))
