"""QualiCLIP+: prompt learning from mean opinion scores on top of a frozen QualiCLIP model.

The method of the paper's author (pyiqa's ``qualiclip+``; docs/plus.md): the CLIP (both towers)
stays frozen; each antonym prompt gets its own `N_CTX` learnable context vectors of the text
tower's width, initialised N(0, 0.02), laid out ``[SOT] ctx[:8] <prompt tokens> ctx[8:] [EOT]``.
The score is QualiCLIP's (softmax of the scaled cosines per antonym pair, averaged) with the
learned prompt features in place of the fixed ones. Loss: MSE + PLCC loss (weights 1 and 1)
against MOS rescaled to [0, 1]; Adam, cosine schedule over the epochs.

Cheap by design: the image tower is frozen, so each training image gets a fixed, seeded set of
augmented crops (random crop + horizontal flip) whose features are computed once and reused by
every epoch (``cached_crops``; 0 computes a fresh crop's features at every step instead).

After training the learned prompts become fixed text features: the result is a checkpoint of
the QualiCLIP model with its ``prompt_features`` replaced, which every consumer of a checkpoint
loads unchanged and which scores at exactly QualiCLIP's cost.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import save_checkpoint
from .datasets import IQADataset, load_dataset
from .datasets.base import DatasetError
from .device import resolve_device
from .errors import QualiclipError
from .imageio import read_image
from .metrics import correlations
from .model import QualiCLIP
from .prompts import PROMPT_PAIRS, flat_prompts
from .schema import PlusConfig

N_CTX = 16  # learnable context vectors per prompt: half before the prompt's tokens, half after
CTX_STD = 0.02
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # train / val / test of a dataset without an official split
LEARNER_FILE = "prompt_learner.safetensors"
SPLITS_FILE = "splits.json"
METRICS_FILE = "metrics.json"
TEST_LABEL = "test"  # the evaluation block of the test split (the plus stage's metrics file: test.srcc, ...)


class PlusError(QualiclipError, ValueError):
    """Labelled data or a model that prompt learning cannot use; the message names the fix."""


# ---------------------------------------------------------------------------------------------
# The prompt learner


class PromptLearner(nn.Module):
    """Learnable context around each antonym prompt, encoded by a frozen CLIP text tower.

    ``text_features()`` is open_clip's ``CLIP.encode_text`` with the context vectors spliced into
    the token embeddings, the end-of-text position moved by ``n_ctx`` accordingly (its features
    are the prompt's). ``n_ctx=0`` reproduces the fixed prompt features exactly.
    """

    token_embeds: torch.Tensor  # buffers, registered in __init__
    eot: torch.Tensor
    clip: Any  # open_clip's CLIP, read attribute by attribute (see qualiclip.model.OpenClipModule)

    def __init__(self, clip: Any, name: str, pairs=PROMPT_PAIRS, *, n_ctx: int = N_CTX, seed: int = 0):
        super().__init__()
        if not all(hasattr(clip, a) for a in ("token_embedding", "transformer", "ln_final", "positional_embedding")):
            raise PlusError(
                f"model '{name}' has no plain CLIP text tower (token embedding + transformer); "
                "prompt learning needs one — use a ResNet/ViT CLIP such as RN50 or the project's tiny models"
            )
        if n_ctx % 2:
            raise PlusError(f"n_ctx must be even (half before, half after the prompt), got {n_ctx}")
        object.__setattr__(self, "clip", clip)  # not a submodule: frozen, saved with the checkpoint
        for p in clip.parameters():
            p.requires_grad_(False)
        tokens = open_clip.get_tokenizer(name)(flat_prompts(pairs))  # (P, L)
        length = tokens.shape[1]
        eot = tokens.argmax(dim=-1)  # end-of-text has the highest id (open_clip's argmax pooling)
        if int(eot.max()) + n_ctx >= length:
            raise PlusError(f"a prompt of {int(eot.max())} tokens plus {n_ctx} context tokens exceeds {length}")
        with torch.no_grad():
            self.register_buffer("token_embeds", clip.token_embedding(tokens).float().clone())  # (P, L, W)
        self.register_buffer("eot", eot)
        width = self.token_embeds.shape[-1]
        gen = torch.Generator().manual_seed(seed)
        self.ctx = nn.Parameter(torch.randn(tokens.shape[0], n_ctx, width, generator=gen) * CTX_STD)
        self.n_ctx = n_ctx

    def embeddings(self) -> torch.Tensor:
        """(P, L, W) input embeddings: SOT, front context, prompt tokens, back context, EOT, padding."""
        half = self.n_ctx // 2
        length = self.token_embeds.shape[1]
        rows = []
        for i in range(self.token_embeds.shape[0]):
            emb, ctx, e = self.token_embeds[i], self.ctx[i], int(self.eot[i])
            rows.append(torch.cat([emb[:1], ctx[:half], emb[1:e], ctx[half:], emb[e : length - self.n_ctx]]))
        return torch.stack(rows)

    def text_features(self) -> torch.Tensor:
        """L2-normalised float32 features of the learned prompts, (P, D), in checkpoint row order."""
        clip = self.clip
        x = self.embeddings() + clip.positional_embedding.float()
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), self.eot + self.n_ctx]
        proj = clip.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x.float(), dim=-1)


def score_features(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """QualiCLIP's score of L2-normalised image features (N, D) against prompt features (2K, D):
    mean over pairs of softmax(scale · [cos+, cos−])[0], (N,), differentiable."""
    sims = (image_features @ text_features.T).view(image_features.shape[0], -1, 2)
    return torch.softmax(logit_scale * sims, dim=-1)[..., 0].mean(dim=-1)


def plcc_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(1 − PLCC) / 2 over the batch: 0 for perfectly linear, 1 for perfectly anti-linear."""
    vp, vt = pred - pred.mean(), target - target.mean()
    r = (vp * vt).sum() / (vp.norm() * vt.norm() + eps)
    return (1 - r) / 2


def plus_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE + PLCC loss, weights 1 and 1 (target: MOS rescaled to [0, 1])."""
    return F.mse_loss(pred, target) + plcc_loss(pred, target)


def plus_model(model: QualiCLIP, learner: PromptLearner) -> QualiCLIP:
    """A copy of ``model`` whose fixed prompt features are the learner's: QualiCLIP's cost, QualiCLIP+'s scores."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.prompt_features.copy_(learner.text_features().to(out.prompt_features.device))
    return out


# ---------------------------------------------------------------------------------------------
# Labelled data: reader, checks, splits


def load_labelled(spec: dict) -> IQADataset:
    """The dataset ``{name, root, **loader options}`` of ``plus.dataset``, read by the evaluation
    readers (any official layout, ``csv``, ``pyiqa``); every label checked against its image."""
    spec = dict(spec)
    missing = [k for k in ("name", "root") if k not in spec]
    if missing:
        raise PlusError(f"plus.dataset lacks {missing} — write e.g. {{name: csv, root: /data/mine, ...}}")
    spec.pop("label", None)
    try:
        return load_dataset(spec.pop("name"), spec.pop("root"), **spec)
    except DatasetError as exc:
        raise PlusError(f"plus.dataset: {exc}") from None


def make_splits(ds: IQADataset, seed: int) -> dict[str, list[int]]:
    """Item indices per split: the official train/val/test where the release has a train and a
    test split, else a seeded random 70/10/20 split."""
    if {"train", "test"} <= set(ds.splits):
        names = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
        return {k: [i for i, it in enumerate(ds.items) if it.split in v] for k, v in names.items()}
    order = np.random.default_rng(seed).permutation(len(ds)).tolist()
    n_train = int(round(SPLIT_FRACTIONS[0] * len(ds)))
    n_val = int(round(SPLIT_FRACTIONS[1] * len(ds)))
    return {
        "train": sorted(order[:n_train]),
        "val": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }


def split_record(ds: IQADataset, splits: dict[str, list[int]], official: bool) -> dict:
    """What to record of the splits: each one's image names (relative to the root), size and digest."""
    record: dict = {"dataset": ds.name, "official": official, "splits": {}}
    for name, idx in splits.items():
        rows = [[_shown(ds.items[i].path, ds.root), ds.items[i].raw_mos] for i in idx]
        digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
        record["splits"][name] = {"n": len(rows), "digest": digest, "images": [r[0] for r in rows]}
    return record


def _shown(path: Path, root: Path) -> str:
    """``path`` relative to the dataset root where it lies under it (digests survive moving the set), else as is."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def split_dataset(ds: IQADataset, idx: list[int]) -> IQADataset:
    """The items ``idx`` of ``ds`` as a dataset of their own, their official split marks dropped
    (an evaluation reports them as one block, not once more as an official test split)."""
    return replace(ds, items=tuple(replace(ds.items[i], split=None) for i in idx))


def check_labelled(ds: IQADataset, splits: dict[str, list[int]], batch_size: int) -> None:
    """`PlusError` naming the fix for labels that cannot train: non-finite or constant MOS, or a
    train split smaller than a batch. (Missing images and non-numeric scores the reader refuses.)"""
    mos = ds.mos()
    if not np.isfinite(mos).all():
        raise PlusError(
            f"plus.dataset {ds.root}: {int((~np.isfinite(mos)).sum())} MOS values are not finite — fix them"
        )
    if len(mos) and np.ptp(mos) == 0:
        raise PlusError(
            f"plus.dataset {ds.root}: all {len(mos)} MOS values are {mos[0]:g} — nothing to learn; "
            "check the score column of the labels"
        )
    n_train = len(splits["train"])
    if n_train < batch_size:
        raise PlusError(
            f"plus.dataset {ds.root}: the train split holds {n_train} images, fewer than plus.batch_size "
            f"{batch_size} — add rated images or lower plus.batch_size"
        )
    train_mos = mos[splits["train"]]
    if np.ptp(train_mos) == 0:
        raise PlusError(
            f"plus.dataset {ds.root}: every train-split MOS is {train_mos[0]:g} — nothing to learn; add varied ratings"
        )


def rescaled_mos(ds: IQADataset) -> np.ndarray:
    """Higher-is-better MOS rescaled from the dataset's declared range to [0, 1]."""
    lo, hi = ds.mos_range
    return (ds.mos() - lo) / (hi - lo)


# ---------------------------------------------------------------------------------------------
# Images and features


# Training-only resizes of the paper's recipe (pyiqa's QualiCLIP+ train options): FLIVE's shorter
# side goes to a random size in [384, 416] (pyiqa's `random_arp_resize`, bilinear), drawn anew for
# every crop, before the random crop. SPAQ's shorter side 512 is its evaluation rule as well
# (`IQADataset.resize_short_side`), which training applies first anyway.
TRAIN_RESIZE = {"flive": (384, 416)}


def load_pixels(path: Path, resize_short: int | None, min_side: int) -> np.ndarray:
    """RGB uint8 (H, W, 3): the dataset's resize rule applied, then upscaled so the shorter side
    is at least ``min_side`` (the crop)."""
    pixels = read_image(path).pixels
    short = min(pixels.shape[:2])
    target = resize_short if resize_short else short
    return resize_short_side(pixels, max(target, min_side), Image.Resampling.BICUBIC)


def resize_short_side(pixels: np.ndarray, target: int, resample: Image.Resampling) -> np.ndarray:
    """``pixels`` with the shorter side at ``target``, the aspect ratio kept (unchanged if it is already)."""
    h, w = pixels.shape[:2]
    short = min(h, w)
    if target == short:
        return pixels
    size = (max(1, round(w * target / short)), max(1, round(h * target / short)))
    return np.asarray(Image.fromarray(pixels).resize(size, resample))


def augmented_crops(
    pixels: np.ndarray,
    crop: int,
    n: int,
    rng: np.random.Generator,
    resize_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``n`` random ``crop`` x ``crop`` crops, each flipped horizontally with probability 1/2, (n, 3, crop, crop) in [0, 1].

    ``resize_range`` (`TRAIN_RESIZE`): before each crop, the shorter side goes to a random size in
    that range, both ends included (at least ``crop``)."""
    out = np.empty((n, crop, crop, 3), dtype=np.uint8)
    for k in range(n):
        image = pixels
        if resize_range is not None:
            side = max(crop, int(rng.integers(resize_range[0], resize_range[1] + 1)))
            image = resize_short_side(pixels, side, Image.Resampling.BILINEAR)
        h, w = image.shape[:2]
        top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        patch = image[top : top + crop, left : left + crop]
        out[k] = patch[:, ::-1] if rng.random() < 0.5 else patch
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0


def training_crops(ds: IQADataset, i: int, crop: int, n: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` augmented training crops of item ``i`` of ``ds`` by the paper's recipe for that dataset:
    its resize rule (SPAQ: shorter side 512), its training resize (`TRAIN_RESIZE`: FLIVE), then
    random ``crop`` crops with horizontal flips, (n, 3, crop, crop) in [0, 1]."""
    pixels = load_pixels(ds.items[i].path, ds.resize_short_side, crop)
    return augmented_crops(pixels, crop, n, rng, TRAIN_RESIZE.get(ds.name))


@torch.no_grad()
def encode_crops(model: QualiCLIP, crops: torch.Tensor, device: torch.device, batch: int) -> torch.Tensor:
    """Frozen image features of ``crops`` (N, 3, c, c), (N, D) float32 on the CPU."""
    feats = [model.encode(crops[i : i + batch].to(device)).cpu() for i in range(0, len(crops), batch)]
    return torch.cat(feats)


@torch.no_grad()
def full_image_features(model: QualiCLIP, ds: IQADataset, idx: list[int], device: torch.device) -> torch.Tensor:
    """Features of whole images (the dataset's resize rule, as evaluation scores them), (len(idx), D)."""
    feats = []
    for i in idx:
        pixels = load_pixels(ds.items[i].path, ds.resize_short_side, model.min_side)
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].float() / 255.0
        feats.append(model.encode(x.to(device)).cpu())
    return torch.cat(feats) if feats else torch.empty(0)


class CropCache:
    """Features of a fixed, seeded set of ``n`` augmented crops per training image, computed once."""

    def __init__(self, model, ds, idx, crop, n, seed, device, batch):
        rows = []
        for i in idx:
            crops = training_crops(ds, i, crop, n, np.random.default_rng([seed, i]))
            rows.append(encode_crops(model, crops, device, batch))
        self.features = torch.stack(rows)  # (n_images, n, D)

    def batch(self, rows: torch.Tensor, gen: torch.Generator, epoch: int) -> torch.Tensor:
        pick = torch.randint(self.features.shape[1], (len(rows),), generator=gen)
        return self.features[rows, pick]


class FreshCrops:
    """No cache: every step reads, crops and encodes its images again (what a cache saves)."""

    def __init__(self, model, ds, idx, crop, seed, device, batch):
        self.model, self.ds, self.idx, self.crop, self.seed, self.device, self.bs = (
            model,
            ds,
            idx,
            crop,
            seed,
            device,
            batch,
        )

    def batch(self, rows: torch.Tensor, gen: torch.Generator, epoch: int) -> torch.Tensor:
        crops = []
        for r in rows.tolist():
            i = self.idx[r]
            crops.append(training_crops(self.ds, i, self.crop, 1, np.random.default_rng([self.seed, i, epoch + 1])))
        return encode_crops(self.model, torch.cat(crops), self.device, self.bs)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class PlusResult:
    """What `train_plus` returns: the learner, the QualiCLIP+ model, the splits and the figures."""

    learner: PromptLearner
    model: QualiCLIP
    splits: dict[str, list[int]]
    official_split: bool
    log: list[dict] = field(default_factory=list)  # per epoch: loss, val SRCC, seconds
    metrics: dict = field(default_factory=dict)  # test split: the QualiCLIP+ model and the model it starts from
    best_epoch: int = 0


def train_plus(
    model: QualiCLIP,
    ds: IQADataset,
    cfg: PlusConfig,
    *,
    splits: dict[str, list[int]] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> PlusResult:
    """Learn the prompts of ``model`` (frozen) from the MOS of ``ds``; checks first, then trains.

    The returned model is the epoch with the best validation SRCC (the last where the val split
    has fewer than 3 images).
    """
    official = splits is None and {"train", "test"} <= set(ds.splits)
    splits = splits if splits is not None else make_splits(ds, cfg.seed)
    check_labelled(ds, splits, cfg.batch_size)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    learner = PromptLearner(model.clip, model.cfg.name, seed=cfg.seed).to(device)
    target = torch.tensor(rescaled_mos(ds), dtype=torch.float32)
    train_idx = splits["train"]
    source: CropCache | FreshCrops
    if cfg.cached_crops:
        source = CropCache(model, ds, train_idx, cfg.crop, cfg.cached_crops, cfg.seed, device, cfg.batch_size)
    else:
        source = FreshCrops(model, ds, train_idx, cfg.crop, cfg.seed, device, cfg.batch_size)
    val_feats = full_image_features(model, ds, splits["val"], device) if len(splits["val"]) >= 3 else None
    opt = torch.optim.Adam([learner.ctx], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = PlusResult(learner, model, splits, official)
    best, best_ctx = -math.inf, learner.ctx.detach().clone()
    y_train = target[train_idx]
    for epoch in range(cfg.epochs):
        start, losses = time.perf_counter(), []
        for rows in torch.randperm(len(train_idx), generator=gen).split(cfg.batch_size):
            feats = source.batch(rows, gen, epoch).to(device)
            pred = score_features(feats, learner.text_features(), model.cfg.logit_scale)
            loss = plus_loss(pred, y_train[rows].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        sched.step()
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": time.perf_counter() - start}
        if val_feats is not None:
            row["val_srcc"] = _srcc(learner, val_feats, target[splits["val"]], model.cfg.logit_scale, device)
        result.log.append(row)
        if on_epoch:
            on_epoch(row)
        score = row.get("val_srcc", epoch)  # no val split: the last epoch
        if score > best:
            best, best_ctx, result.best_epoch = score, learner.ctx.detach().clone(), epoch + 1
    with torch.no_grad():
        learner.ctx.copy_(best_ctx)
    result.model = plus_model(model, learner)
    result.metrics = test_metrics(model, result.model, ds, splits["test"], device)
    return result


def _srcc(learner: PromptLearner, feats: torch.Tensor, mos: torch.Tensor, scale: float, device) -> float:
    with torch.no_grad():
        pred = score_features(feats.to(device), learner.text_features(), scale).cpu().numpy()
    return correlations(pred, mos.numpy())["srcc"]


def test_metrics(base: QualiCLIP, plus: QualiCLIP, ds: IQADataset, idx: list[int], device) -> dict:
    """SRCC/PLCC on the test split of the QualiCLIP+ model and of the QualiCLIP model it starts from,
    the same images (one image-tower pass: the two differ in prompt features only)."""
    if len(idx) < 3:
        return {}
    feats = full_image_features(base, ds, idx, device).to(device)
    mos = ds.mos()[idx]
    out = {}
    for name, m in (("plus", plus), ("base", base)):
        scores = m.score_from_similarities((feats @ m.prompt_features.T).view(len(idx), -1, 2)).cpu().numpy()
        out[name] = {**correlations(scores, mos), "n": len(idx)}
    return out


def save_plus(result: PlusResult, ds: IQADataset, out_dir: Path, metadata: dict | None = None) -> Path:
    """Write ``out_dir``: ``checkpoint/`` (a QualiCLIP checkpoint every command loads), the learned
    weights (`LEARNER_FILE`: the context vectors and the prompts' token buffers), the splits with
    their digests, the test metrics and the per-epoch log."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = split_record(ds, result.splits, result.official_split)
    meta = {
        **(metadata or {}),
        "variant": "qualiclip+",
        "best_epoch": result.best_epoch,
        "splits": {k: {"n": v["n"], "digest": v["digest"]} for k, v in record["splits"].items()},
    }
    checkpoint = save_checkpoint(result.model.cpu(), out_dir / "checkpoint", meta)
    learner = result.learner
    state = {
        "ctx": learner.ctx.detach().cpu().contiguous(),
        "token_embeds": learner.token_embeds.cpu().contiguous(),
        "eot": learner.eot.cpu().contiguous(),
    }
    save_file(state, str(out_dir / LEARNER_FILE))
    (out_dir / SPLITS_FILE).write_text(json.dumps(record, indent=1))
    (out_dir / METRICS_FILE).write_text(json.dumps({"test": result.metrics, "log": result.log}, indent=1))
    return checkpoint


# ---------------------------------------------------------------------------------------------
# Interoperability with pyiqa's QualiCLIP+ weights (docs/plus.md, "pyiqa's weights")

# pyiqa's `QualiCLIP.prompt_pairs` (archs/qualiclip_arch.py), in its order: the learner's rows.
PYIQA_PROMPTS = (
    "Good photo.",
    "Bad photo.",
    "Sharp image.",
    "Blurry image.",
    "Sharp edges.",
    "Blurry edges.",
    "High-resolution image.",
    "Low-resolution image.",
    "Noise-free image.",
    "Noisy image.",
    "High-quality image.",
    "Low-quality image.",
    "Good picture.",
    "Bad picture.",
)
PYIQA_KEYS = ("prompt_learner.ctx", "prompt_learner.token_prefix", "prompt_learner.token_suffix")
PYIQA_PARAM_KEY = "params"  # pyiqa saves {param_key: state_dict} and loads the 'params' entry


def _check_pyiqa_prompts(pairs) -> None:
    if tuple(flat_prompts(pairs)) != PYIQA_PROMPTS:
        raise PlusError(
            "pyiqa's QualiCLIP+ learns the 14 prompts of the paper in their order; qualiclip.prompts.PROMPT_PAIRS "
            "differ — restore the paper's prompt pairs"
        )


def read_pyiqa_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The three prompt-learner tensors of a pyiqa ``QualiCLIP+_*.pth`` file (``{'params': state}``
    or a bare state dict), read with ``torch.load(weights_only=True)``: no pickled code runs."""
    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise PlusError(
            f"cannot read pyiqa weights {path}: {type(exc).__name__} — pass a QualiCLIP+_*.pth file"
        ) from None
    state = raw.get(PYIQA_PARAM_KEY, raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise PlusError(f"pyiqa weights {path} hold no state dict — pass a QualiCLIP+_*.pth file")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if sorted(state) != sorted(PYIQA_KEYS) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PlusError(
            f"pyiqa weights {path} hold keys {sorted(state)[:6]}, not {list(PYIQA_KEYS)} — pass pyiqa's "
            "QualiCLIP+_*.pth prompt-learner file (qualiclip+, -clive, -flive, -spaq), not QualiCLIP.pth"
        )
    return {k.removeprefix("prompt_learner."): v.detach().float() for k, v in state.items()}


def learner_from_pyiqa(model: QualiCLIP, path: str | Path) -> PromptLearner:
    """A `PromptLearner` on ``model``'s text tower holding pyiqa's learned context vectors and
    token buffers, so its ``text_features()`` are the prompt features pyiqa computes from the
    same file and text tower. Shapes are checked against the model; a mismatch names the fix."""
    _check_pyiqa_prompts(PROMPT_PAIRS)
    w = read_pyiqa_weights(path)
    ctx, prefix, suffix = w["ctx"], w["token_prefix"], w["token_suffix"]
    p = len(PYIQA_PROMPTS)
    if ctx.dim() == 2:  # pyiqa's prompt_specific_ctx=False: one context shared by every prompt
        ctx = ctx.unsqueeze(0).expand(p, -1, -1)
    got = {"ctx": tuple(ctx.shape), "token_prefix": tuple(prefix.shape), "token_suffix": tuple(suffix.shape)}
    n_ctx = ctx.shape[1] if ctx.dim() == 3 and ctx.shape[1] > 0 and ctx.shape[1] % 2 == 0 else N_CTX
    learner = PromptLearner(model.clip, model.cfg.name, n_ctx=n_ctx)
    length, width = learner.token_embeds.shape[1:]
    want = {"ctx": (p, n_ctx, width), "token_prefix": (p, 1, width), "token_suffix": (p, length - 1 - n_ctx, width)}
    if got != want:
        raise PlusError(
            f"pyiqa weights {path} have shapes {got}, this model's text tower needs {want} — use the QualiCLIP "
            "checkpoint of the CLIP the weights were learned on (pyiqa's QualiCLIP+: RN50, text width 512)"
        )
    with torch.no_grad():
        learner.ctx.copy_(ctx)
        tail = suffix[:, -1:].expand(-1, n_ctx, -1)  # rows past the padding the layout never reads
        learner.token_embeds.copy_(torch.cat([prefix, suffix, tail], dim=1))
    return learner


def pyiqa_state_dict(learner: PromptLearner) -> dict[str, torch.Tensor]:
    """The learner in pyiqa's layout: per-prompt ``ctx`` (P, n_ctx, W), ``token_prefix`` (P, 1, W:
    start of text) and ``token_suffix`` (P, L − 1 − n_ctx, W: the prompt's tokens, end of text, padding)."""
    _check_pyiqa_prompts(PROMPT_PAIRS)
    if learner.token_embeds.shape[0] != len(PYIQA_PROMPTS):
        raise PlusError(f"the learner has {learner.token_embeds.shape[0]} prompts, pyiqa's QualiCLIP+ has 14")
    emb = learner.token_embeds.detach().cpu().float()
    length = emb.shape[1]
    return {
        "prompt_learner.ctx": learner.ctx.detach().cpu().float().contiguous(),
        "prompt_learner.token_prefix": emb[:, :1].contiguous(),
        "prompt_learner.token_suffix": emb[:, 1 : length - learner.n_ctx].contiguous(),
    }


def export_pyiqa(learner: PromptLearner, out_file: str | Path) -> Path:
    """Write ``out_file`` as pyiqa writes ``QualiCLIP+_*.pth`` (``{'params': state}``): pyiqa's
    ``load_pretrained_network(net, out_file, True, 'params')`` loads it into its QualiCLIP+."""
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({PYIQA_PARAM_KEY: pyiqa_state_dict(learner)}, out)
    return out


def read_learner(path: str | Path, model: QualiCLIP) -> PromptLearner:
    """The learner saved by `save_plus` (`LEARNER_FILE`), on ``model``'s text tower."""
    path = Path(path)
    if not path.is_file():
        raise PlusError(f"no {path} — pass the plus stage's output folder (it holds {LEARNER_FILE})")
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise PlusError(f"cannot read {path}: {type(exc).__name__} — rerun the plus stage to rewrite it") from None
    if sorted(state) != ["ctx", "eot", "token_embeds"] or state["ctx"].dim() != 3:
        raise PlusError(
            f"{path} holds {sorted(state)}, not ctx/eot/token_embeds — pass a {LEARNER_FILE} of the plus stage"
        )
    learner = PromptLearner(model.clip, model.cfg.name, n_ctx=state["ctx"].shape[1])
    for name in ("ctx", "token_embeds", "eot"):
        have = getattr(learner, name)
        if tuple(have.shape) != tuple(state[name].shape) or (name == "eot" and not torch.equal(have, state[name])):
            raise PlusError(
                f"{path}: {name} does not fit the model's text tower — pass the checkpoint it was learned on"
            )
    with torch.no_grad():
        learner.ctx.copy_(state["ctx"])
        learner.token_embeds.copy_(state["token_embeds"])
    return learner


def save_learner(learner: PromptLearner, path: str | Path) -> Path:
    """Write the learner as `save_plus` does (`LEARNER_FILE`: context vectors and token buffers)."""
    state = {
        "ctx": learner.ctx.detach().cpu().contiguous(),
        "token_embeds": learner.token_embeds.cpu().contiguous(),
        "eot": learner.eot.cpu().contiguous(),
    }
    save_file(state, str(path))
    return Path(path)


def import_pyiqa(model: QualiCLIP, weights: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir`` as the plus stage does (``checkpoint/`` + `LEARNER_FILE`) from pyiqa's
    ``QualiCLIP+_*.pth`` on ``model``: a QualiCLIP+ checkpoint every command scores with."""
    learner = learner_from_pyiqa(model, weights)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    meta = {"variant": "qualiclip+", "source": "pyiqa", "pyiqa_weights": Path(weights).name, "sha256": digest}
    checkpoint = save_checkpoint(plus_model(model, learner).cpu(), out_dir / "checkpoint", meta)
    save_learner(learner, out_dir / LEARNER_FILE)
    return checkpoint
