"""Scoring images with a QualiCLIP: batched by equal size, at full resolution by default.

Three entry points, from the lowest level up:

- `score_arrays(model, images)`: decoded images already in memory.
- `score_paths(paths, model)`: image files, streamed (at most ``batch_size`` decoded images are
  held at once), batched by equal size across the whole list, unreadable files reported per file.
- `score_images(items, model)`: the user API; paths, arrays and tensors mixed.

All of them score with an *inference copy* of the model (`inference_copy`, or `load_scorer` straight
from a checkpoint): the image encoder alone, BatchNorm folded into the convolutions, no text
tower; a ResNet encoder is rebuilt as a `fast_encoder.FastEncoder` (fused convolutions, pooled
attention, normalisation folded, uint8 pixels in). It gives the model's scores to float rounding
(< 1e-5) and runs faster, with less memory (figures in docs/evaluation.md).
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from torch import nn

from .checkpoint import load_checkpoint, load_image_encoder
from .device import resolve_device
from .errors import QualiclipError
from .imageio import DEFAULT_MAX_PIXELS, ImageReadError, read_image
from .fast_encoder import FastEncoder, can_build
from .model import ModelConfig, QualiCLIP
from .prompts import CLIP_MEAN, CLIP_STD

PRECISIONS = ("fp32", "bf16", "fp16")
# A batch holds at most this many pixels: RN50 at 1024x768 then runs one image per batch (peak RSS
# ~1.4 GB); bigger batches gain little on a CPU and raise the peak memory (docs/evaluation.md).
DEFAULT_MAX_BATCH_PIXELS = 800_000


class ScoringError(QualiclipError, ValueError):
    """An input or option the scorer cannot use; the message names the fix."""


# ---------------------------------------------------------------------------------------------
# The inference copy


class _ImageTower(nn.Module):
    """What scoring needs of a CLIP: the image encoder only (the text tower is ~40% of RN50)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual


def inference_copy(model: QualiCLIP) -> QualiCLIP:
    """A scoring-only copy of ``model``: image encoder with BatchNorm folded, no text tower.

    ``model`` is left untouched (it can still be trained or saved); the copy cannot be saved as a
    checkpoint. Calling it on a copy returns the copy itself.
    """
    if is_inference_copy(model):
        return model
    visual = copy.deepcopy(model.visual).eval()
    fold_batchnorm(visual)
    scorer = QualiCLIP(_ImageTower(_scoring_encoder(visual, model.cfg)), model.prompt_features.detach().clone(),
                       model.cfg)
    scorer.requires_grad_(False)
    return scorer.to(model.prompt_features.device).eval()


def is_inference_copy(model: QualiCLIP) -> bool:
    return isinstance(model.clip, _ImageTower)


def _scoring_encoder(visual: nn.Module, cfg: ModelConfig) -> nn.Module:
    """A folded encoder as scoring runs it: a `FastEncoder` for a ModifiedResNet, else itself."""
    return FastEncoder(visual, CLIP_MEAN, CLIP_STD, cfg.pos_embedding) if can_build(visual) else visual


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold eval-mode ``BatchNorm2d`` into the ``Conv2d`` before it, in place; returns ``module``.

    The convolution weights are overwritten: fold a copy (as `inference_copy` does), never a
    model that will be trained or saved.

    Pairs folded: sibling children named ``convN``/``bnN`` (open_clip's ModifiedResNet stem and
    bottlenecks) and a ``Conv2d`` directly followed by a ``BatchNorm2d`` inside an
    ``nn.Sequential`` (its downsample branch). The BatchNorm becomes ``nn.Identity``.
    """
    for child in module.children():
        fold_batchnorm(child)
    names = [name for name, _ in module.named_children()]
    pairs = [(n, f"bn{n[4:]}") for n in names if n.startswith("conv") and f"bn{n[4:]}" in names]
    if isinstance(module, nn.Sequential):
        pairs += list(zip(names, names[1:]))
    for conv_name, bn_name in pairs:
        conv, bn = getattr(module, conv_name), getattr(module, bn_name)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and not bn.training:
            _fold_pair(conv, bn)
            setattr(module, bn_name, nn.Identity())
    return module


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv <- bn(conv): the weights are scaled in place (no second copy of them in memory)."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (C_out,)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)


def load_scorer(path: str | Path) -> QualiCLIP:
    """The inference copy of a checkpoint, read without building the text tower.

    A checkpoint folder of this project goes through `load_image_encoder` (only the image
    encoder's tensors and the prompt features are read: for RN50 ~150 MB of peak memory instead
    of ~560 MB); anything else (an official ``.pth``) through `load_checkpoint` and `inference_copy`.
    """
    encoder = load_image_encoder(path)
    if encoder is None:
        return inference_copy(load_checkpoint(path))
    visual, prompts, cfg = encoder
    scorer = QualiCLIP(_ImageTower(_scoring_encoder(fold_batchnorm(visual.eval()), cfg)), prompts, cfg)
    return scorer.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------
# In-memory images


def _autocast(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise ScoringError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if device.type == "cpu" and precision == "fp16":
        raise ScoringError("fp16 needs a GPU (--device cuda); on a CPU use bf16 or fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def plan_batches(shapes: Sequence[tuple], batch_size: int, max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS) -> list[list[int]]:
    """Indices grouped by equal shape, in chunks of at most ``batch_size`` images and
    ``max_batch_pixels`` pixels (never fewer than one image)."""
    if batch_size < 1:
        raise ScoringError(f"batch_size must be >= 1, got {batch_size}")
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i, shape in enumerate(shapes):
        by_shape[tuple(shape)].append(i)
    batches = []
    for shape, idx in by_shape.items():
        n = max(1, min(batch_size, max_batch_pixels // max(1, shape[0] * shape[1])))
        batches += [idx[k:k + n] for k in range(0, len(idx), n)]
    return batches


def _to_batch(images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """(B, 3, H, W) from equal-size (H, W, 3) arrays: uint8 stays uint8 (the model converts it
    with its normalisation), floats in [0, 1] become float32."""
    x = torch.from_numpy(np.stack(images)).to(device)
    return (x if x.dtype == torch.uint8 else x.float()).permute(0, 3, 1, 2)


def _check_array(image: np.ndarray, index: int) -> None:
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
        got = getattr(image, "shape", type(image).__name__)
        raise ScoringError(f"image {index} has shape {got}; expected (H, W, 3) RGB "
                           "(uint8, or float in [0, 1]) — convert greyscale/RGBA to RGB first")


@torch.inference_mode()
def score_arrays(
    model: QualiCLIP,
    images: Sequence[np.ndarray],
    *,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    progress=None,
    max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS,
) -> np.ndarray:
    """Scores (N,) for (H, W, 3) RGB arrays, uint8 or float in [0, 1]; equal sizes share batches.

    ``device`` None keeps the model where it is; ``"auto"`` picks CUDA when available.
    ``precision`` bf16/fp16 autocasts (fp16 on GPU only). ``progress`` gets ``update(n)`` per batch.
    """
    device = model.prompt_features.device if device is None else resolve_device(device)
    for i, im in enumerate(images):
        _check_array(im, i)
    amp = _autocast(device, precision)  # validates precision before any work
    scorer = inference_copy(model).to(device)
    scores = np.empty(len(images), dtype=np.float64)
    for chunk in plan_batches([im.shape for im in images], batch_size, max_batch_pixels):
        x = _to_batch([images[i] for i in chunk], device)
        with amp:
            scores[chunk] = scorer(x).cpu().numpy()
        if progress is not None:
            progress.update(len(chunk))
    return scores


# ---------------------------------------------------------------------------------------------
# Files


@dataclass(frozen=True)
class FileScore:
    """One file's result: ``score`` None and ``error`` set when the file could not be scored.
    ``width``/``height`` are the decoded (upright) size, before any evaluation resize."""

    path: Path
    score: float | None
    width: int | None
    height: int | None
    error: str = ""


def probe_size(path: Path) -> tuple[int, int] | None:
    """(height, width) of the upright image from its header alone, or None if it cannot be parsed.

    Used only to group files into batches; `read_image` decides what is readable.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - any failure means "decode it alone and let read_image report"
        return None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)  # EXIF 5-8 rotate by 90 degrees


def resize_short_side(image: np.ndarray, short: int | None) -> np.ndarray:
    """Resize so the shorter side is ``short`` pixels (area when shrinking, cubic when enlarging)."""
    if not short:
        return image
    h, w = image.shape[:2]
    s = short / min(h, w)
    size = (round(w * s), round(h * s))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)


def score_paths(
    paths: Sequence[str | Path],
    model: QualiCLIP,
    *,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    max_pixels: int | None = None,
    resize_short: int | None = None,
    progress=None,
) -> list[FileScore]:
    """Score image files in input order; an unreadable file gets an ``error``, never an exception.

    Files are grouped by header size over the whole list, then decoded and scored one batch at a
    time, so memory holds at most ``batch_size`` decoded images whatever the number of files.
    ``resize_short`` resizes the shorter side first (the SPAQ protocol); None = full resolution.
    """
    paths = [Path(p) for p in paths]
    scorer = inference_copy(model)
    results: list[FileScore | None] = [None] * len(paths)
    for chunk in plan_batches([probe_size(p) or (0, 0, i) for i, p in enumerate(paths)], batch_size, 1 << 62):
        decoded = _decode_chunk([paths[i] for i in chunk], max_pixels, resize_short)
        ok = [k for k, d in enumerate(decoded) if isinstance(d, tuple)]
        if ok:
            scores = score_arrays(scorer, [decoded[k][0] for k in ok], batch_size=batch_size, device=device,
                                  precision=precision)
            for k, s in zip(ok, scores):
                h, w = decoded[k][1]
                results[chunk[k]] = FileScore(paths[chunk[k]], float(s), w, h)
        for k, d in enumerate(decoded):
            if isinstance(d, str):
                results[chunk[k]] = FileScore(paths[chunk[k]], None, None, None, d)
        if progress is not None:
            progress.update(len(chunk))
    return results


def _decode_chunk(paths: list[Path], max_pixels: int | None, resize_short: int | None) -> list:
    """Per path: ``(pixels, (h, w))`` with pixels resized if asked, or the error text."""
    out: list = []
    for path in paths:
        try:
            pixels = read_image(path, max_pixels=max_pixels or DEFAULT_MAX_PIXELS).pixels
        except ImageReadError as exc:
            out.append(f"{exc.reason}: {exc.detail}")
            continue
        out.append((resize_short_side(pixels, resize_short), pixels.shape[:2]))
    return out


# ---------------------------------------------------------------------------------------------
# The user API


def score_images(
    items: Iterable[str | Path | np.ndarray | torch.Tensor],
    model: QualiCLIP | str | Path,
    *,
    batch_size: int = 16,
    device: str | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """Quality scores (N,) in [0, 1], higher is better, in the order of ``items``.

    An item is an image path; an (H, W, 3) RGB array (uint8, or float in [0, 1]); or a torch
    tensor (3, H, W) float in [0, 1] or uint8 — a (N, 3, H, W) tensor counts as N images.
    ``model`` is a loaded `QualiCLIP` or a checkpoint path (folder or official ``.pth``);
    ``device`` None scores where the model is. An unreadable path raises `ScoringError` (use `score_paths` to get per-file errors instead).
    """
    scorer = inference_copy(_as_model(model))
    arrays, files = [], []
    for item in items:
        if isinstance(item, torch.Tensor) and item.ndim == 4:
            arrays += [(len(arrays) + len(files), _tensor_to_array(t)) for t in item]
        elif isinstance(item, (torch.Tensor, np.ndarray)):
            arrays.append((len(arrays) + len(files), _tensor_to_array(item) if isinstance(item, torch.Tensor) else item))
        else:
            files.append((len(arrays) + len(files), Path(item)))
    scores = np.empty(len(arrays) + len(files))
    common = dict(batch_size=batch_size, device=device, precision=precision)
    if arrays:
        scores[[i for i, _ in arrays]] = score_arrays(scorer, [a for _, a in arrays], **common)
    if files:
        results = score_paths([p for _, p in files], scorer, **common)
        bad = [r for r in results if r.error]
        if bad:
            raise ScoringError(f"cannot read {len(bad)} image(s), first {bad[0].path}: {bad[0].error} — "
                               "fix or drop them, or call score_paths() to get per-file errors")
        scores[[i for i, _ in files]] = [r.score for r in results]
    return scores


def _as_model(model: QualiCLIP | str | Path) -> QualiCLIP:
    return model if isinstance(model, QualiCLIP) else load_checkpoint(model)


def _tensor_to_array(t: torch.Tensor) -> np.ndarray:
    """(3, H, W) tensor -> (H, W, 3) array, keeping uint8 as uint8 and floats unquantised."""
    if t.ndim != 3 or t.shape[0] != 3:
        raise ScoringError(f"tensor of shape {tuple(t.shape)}; expected (3, H, W) or (N, 3, H, W) RGB")
    t = t.detach().cpu().permute(1, 2, 0)
    return t.numpy() if t.dtype == torch.uint8 else t.float().numpy()
