"""Scoring images with a QualiCLIP: batched by equal size, at full resolution by default.

Three entry points, from the lowest level up:

- `score_arrays(model, images)`: decoded images already in memory.
- `score_paths(paths, model)`: image files, streamed (at most ``batch_size`` decoded images are
  held at once), batched by equal size across the whole list, unreadable files reported per file.
- `score_images(items, model)`: the user API; paths, arrays and tensors mixed.

Every image is checked before it is scored (`image_problem`): at least the encoder's minimum
side, and an estimated peak memory within a budget (``max_memory``, default half the memory of
the scoring device). `score_paths` reports a failed check per file; the others raise.

All of them score with an *inference copy* of the model (`inference_copy`, or `load_scorer` straight
from a checkpoint): the image encoder alone, BatchNorm folded into the convolutions, no text
tower; a ResNet encoder is rebuilt as a `fast_encoder.FastEncoder` (fused convolutions, pooled
attention, normalisation folded, uint8 pixels in). It gives the model's scores to float rounding
(< 1e-5) and runs faster, with less memory (figures in docs/evaluation.md).
"""

from __future__ import annotations

import copy
import os
import weakref
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch import nn

from .checkpoint import load_checkpoint, load_image_encoder
from .device import resolve_device
from .errors import QualiclipError
from .fast_encoder import FastEncoder, can_build
from .files import open_regular
from .imageio import DEFAULT_MAX_PIXELS, ImageReadError, read_image
from .model import ModelConfig, QualiCLIP
from .prompts import CLIP_MEAN, CLIP_STD

PRECISIONS = ("fp32", "bf16", "fp16")
# A batch holds at most this many pixels: RN50 at 1024x768 then runs one image per batch (peak RSS
# ~1.4 GB); bigger batches gain little on a CPU and raise the peak memory (docs/evaluation.md).
DEFAULT_MAX_BATCH_PIXELS = 800_000
# Peak memory of scoring one image, estimated before it is scored: bytes per input pixel =
# ACTIVATION_FACTOR x the encoder's largest activation per pixel + INPUT_BYTES_PER_PIXEL.
# A bottleneck block holds its input, its 3x3 output, its wide 1x1 output and the shortcut at
# once, and oneDNN's fused kernels keep reordered copies: measured (peak - input) / largest
# activation = 1.9-3.0 with the scoring FastEncoder (tiny, small, RN50 at 4-9 MP); 4 leaves a margin.
ACTIVATION_FACTOR = 4.0
# The decoded uint8 image and its stacked copy (3 + 3) plus the float32 batch and its
# normalised copy (12 + 12). Estimates vs. measured peaks: tiny 94 vs 59-61, small 126 vs 87-93,
# RN50 286 vs 208-225 B/px (benchmarks/bench_score_memory.py; docs/evaluation.md).
INPUT_BYTES_PER_PIXEL = 30
DEFAULT_MEMORY_FRACTION = 0.5  # the default budget: this share of the scoring device's memory
MEMORY_OPTION = "--max-memory-gb"  # named in the refusal; the library's keyword is max_memory (bytes)
# the smallest budget a user may set: 1 MB (0.001 GB); a smaller one would refuse every image
MIN_MEMORY_BUDGET = 1_000_000
_BYTES_PER_PIXEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per scorer, probed once


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
    scorer = encoder_scorer(visual, model.prompt_features.detach().clone(), model.cfg)
    return scorer.to(model.prompt_features.device)


def encoder_scorer(
    visual: nn.Module, prompt_features: torch.Tensor, cfg: ModelConfig, *, fast: bool = True
) -> QualiCLIP:
    """A scoring-only QualiCLIP (no text tower, no gradients, eval mode) around an image encoder
    whose BatchNorm is folded already (`fold_batchnorm`). ``fast``: run a ModifiedResNet as a
    `FastEncoder`, as `inference_copy` and `load_scorer` do; ``False`` keeps open_clip's own
    modules (the scorer before the fast encoder, which benchmarks compare against)."""
    encoder = _scoring_encoder(visual, cfg) if fast else visual
    return QualiCLIP(_ImageTower(encoder), prompt_features, cfg).requires_grad_(False).eval()


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
    assert bn.running_var is not None and bn.running_mean is not None  # eval mode: running statistics
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
    return encoder_scorer(fold_batchnorm(visual.eval()), prompts, cfg)


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


def plan_batches(
    shapes: Sequence[tuple], batch_size: int, max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS
) -> list[list[int]]:
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
        batches += [idx[k : k + n] for k in range(0, len(idx), n)]
    return batches


def _to_batch(images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """(B, 3, H, W) from equal-size (H, W, 3) arrays: uint8 stays uint8 (the model converts it
    with its normalisation), floats in [0, 1] become float32."""
    x = torch.from_numpy(np.stack(images)).to(device)
    return (x if x.dtype == torch.uint8 else x.float()).permute(0, 3, 1, 2)


def _check_array(image: np.ndarray, index: int) -> None:
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
        got = getattr(image, "shape", type(image).__name__)
        raise ScoringError(
            f"image {index} has shape {got}; expected (H, W, 3) RGB "
            "(uint8, or float in [0, 1]) — convert greyscale/RGBA to RGB first"
        )


def scoring_device(model: QualiCLIP, device: torch.device | str | None) -> torch.device:
    """Where ``model`` scores: ``device`` resolved (``"auto"``: CUDA when available), or None: where it is."""
    return model.prompt_features.device if device is None else resolve_device(device)


def device_memory(device: torch.device) -> int:
    """Bytes of memory of ``device``: the GPU's own, or the machine's RAM."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): assume 16 GB
        return 16 << 30


def default_memory_budget(device: torch.device) -> int:
    """`DEFAULT_MEMORY_FRACTION` of the memory of ``device`` (`device_memory`)."""
    return int(device_memory(device) * DEFAULT_MEMORY_FRACTION)


def memory_budget(max_memory: int | None, device: torch.device) -> int:
    """The budget in bytes for scoring one image: ``max_memory`` checked, or None: the default.

    The range is `MIN_MEMORY_BUDGET` up to the memory ``device`` has (`device_memory`): a budget
    the device cannot hold would let an image through that then fails mid-run. A value outside
    it (NaN included) is a `ScoringError`, never silently the default.
    """
    if max_memory is None:
        return default_memory_budget(device)
    have = device_memory(device)
    number = isinstance(max_memory, (int, float))
    if not number or not MIN_MEMORY_BUDGET <= max_memory <= have:  # NaN fails the comparison too
        shown = gigabytes(max_memory) if number else repr(max_memory)
        raise ScoringError(
            f"{MEMORY_OPTION} {shown} is outside {gigabytes(MIN_MEMORY_BUDGET)} to {gigabytes(have)} "
            f"(the memory of {device}) — choose a budget in that range, or leave it out for half "
            "the device's memory"
        )
    return int(max_memory)


def gigabytes(n_bytes: float) -> str:
    """Bytes as GB with three significant digits: a small budget is not shown as 0.0 GB."""
    return f"{n_bytes / 1e9:.3g} GB"


@torch.inference_mode()
def bytes_per_pixel(scorer: QualiCLIP) -> float:
    """Estimated peak memory of scoring one image with ``scorer``, in bytes per input pixel.

    The largest activation is measured once per scorer by a forward pass on a 64x64 probe
    (activations of a convolutional encoder grow linearly with the pixels), or at the encoder's
    own image size when it takes no other (a ViT with a fixed positional embedding).
    """
    if scorer not in _BYTES_PER_PIXEL:
        side, device = max(64, scorer.min_side), scorer.prompt_features.device
        try:
            largest = _largest_activation(scorer.visual, side, device)
        except RuntimeError:  # e.g. the shape mismatch of a fixed positional embedding
            native = getattr(scorer.visual, "image_size", None) or 224
            side = max(native) if isinstance(native, (tuple, list)) else int(native)
            largest = _largest_activation(scorer.visual, side, device)
        _BYTES_PER_PIXEL[scorer] = ACTIVATION_FACTOR * largest / side**2 + INPUT_BYTES_PER_PIXEL
    return _BYTES_PER_PIXEL[scorer]


def _largest_activation(visual: nn.Module, side: int, device: torch.device) -> int:
    """Bytes of the largest output of any module of ``visual`` on one ``side`` x ``side`` image."""
    sizes: list[int] = [0]

    def record(module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel() * output.element_size())

    hooks = [m.register_forward_hook(record) for m in visual.modules()]
    try:
        visual(torch.zeros(1, 3, side, side, device=device))
    finally:
        for h in hooks:
            h.remove()
    return max(sizes)


def image_problem(scorer: QualiCLIP, shape: tuple[int, ...], max_memory: int) -> str | None:
    """Why ``scorer`` cannot score an image of ``shape`` (H, W, ...) — ``"reason: detail"`` — or None.

    Too small for the encoder, or an estimated peak memory (`bytes_per_pixel`) above
    ``max_memory`` bytes. Scores stay those of the whole image: nothing is tiled or resized.
    """
    h, w = shape[:2]
    if min(h, w) < scorer.min_side:
        return (
            f"too_small: {w}x{h} px; the image encoder needs at least {scorer.min_side} px on each side "
            "— upscale the image first"
        )
    need = h * w * bytes_per_pixel(scorer)
    if need > max_memory:
        return (
            f"too_large: {w}x{h} px needs an estimated {gigabytes(need)} to score, above the memory budget "
            f"of {gigabytes(max_memory)} — raise {MEMORY_OPTION} (max_memory=) or downscale the image"
        )
    return None


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
    max_memory: int | None = None,
) -> np.ndarray:
    """Scores (N,) for (H, W, 3) RGB arrays, uint8 or float in [0, 1]; equal sizes share batches.

    ``device`` None keeps the model where it is; ``"auto"`` picks CUDA when available.
    ``precision`` bf16/fp16 autocasts (fp16 on GPU only). ``progress`` gets ``update(n)`` per batch.
    An image that fails `image_problem` (``max_memory`` bytes; None: `default_memory_budget`)
    raises `ScoringError` before anything is scored.
    """
    device = scoring_device(model, device)
    for i, im in enumerate(images):
        _check_array(im, i)
    amp = _autocast(device, precision)  # validates precision before any work
    scorer = inference_copy(model).to(device)
    budget = memory_budget(max_memory, device)
    for i, im in enumerate(images):
        if problem := image_problem(scorer, im.shape, budget):
            raise ScoringError(f"image {i}: {problem}")
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
        with open_regular(path) as f, Image.open(f) as im:  # never a FIFO: open() would block
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
    new_h, new_w = resized_shape(h, w, short)
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if short < min(h, w) else cv2.INTER_CUBIC)


def resized_shape(h: int, w: int, short: int | None) -> tuple[int, int]:
    """(height, width) after `resize_short_side` (unchanged when ``short`` is None)."""
    if not short:
        return h, w
    s = short / min(h, w)
    return round(h * s), round(w * s)


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
    max_memory: int | None = None,
    max_pixels_option: str = "max_pixels",
) -> list[FileScore]:
    """Score image files in input order; an unreadable file gets an ``error``, never an exception.

    Files are grouped by header size over the whole list, then decoded and scored one batch at a
    time, so memory holds at most ``batch_size`` decoded images whatever the number of files.
    ``resize_short`` resizes the shorter side first (the SPAQ protocol); None = full resolution.
    A file that fails `image_problem` (too small; above ``max_memory`` bytes, None:
    `default_memory_budget`) gets an ``error`` too. ``max_pixels_option`` is the setting named
    in the "too_large" message of a file above ``max_pixels`` (``--max-pixels`` for the CLI).
    """
    files = [Path(p) for p in paths]
    dev = scoring_device(model, device)
    scorer = inference_copy(model).to(dev)
    _autocast(dev, precision)  # a bad option fails before any file is read
    check = _ImageCheck(scorer, memory_budget(max_memory, dev), resize_short, max_pixels, max_pixels_option)
    results: list[FileScore | None] = [None] * len(files)
    for chunk in plan_batches([probe_size(p) or (0, 0, i) for i, p in enumerate(files)], batch_size, 1 << 62):
        decoded: list[Any] = [check.decode(files[i]) for i in chunk]  # (pixels, (h, w)) or an error text
        ok = [k for k, d in enumerate(decoded) if isinstance(d, tuple)]
        if ok:
            scores = score_arrays(
                scorer,
                [decoded[k][0] for k in ok],
                batch_size=batch_size,
                device=dev,
                precision=precision,
                max_memory=check.max_memory,
            )
            for k, s in zip(ok, scores):
                h, w = decoded[k][1]
                results[chunk[k]] = FileScore(files[chunk[k]], float(s), w, h)
        for k, d in enumerate(decoded):
            if isinstance(d, str):
                results[chunk[k]] = FileScore(files[chunk[k]], None, None, None, d)
        if progress is not None:
            progress.update(len(chunk))
    return results  # type: ignore[return-value]  # every index is filled: each file is in one chunk


@dataclass(frozen=True)
class _ImageCheck:
    """Decode one file for `score_paths` and check it fits the scorer before it is resized."""

    scorer: QualiCLIP
    max_memory: int
    resize_short: int | None
    max_pixels: int | None
    max_pixels_option: str

    def decode(self, path: Path) -> tuple[np.ndarray, tuple[int, int]] | str:
        """``(pixels, (h, w))`` with pixels resized if asked, or the error text ``"reason: detail"``."""
        try:
            pixels = read_image(
                path, max_pixels=self.max_pixels or DEFAULT_MAX_PIXELS, option=self.max_pixels_option
            ).pixels
        except ImageReadError as exc:
            return f"{exc.reason}: {exc.detail}"
        h, w = pixels.shape[:2]
        if problem := image_problem(self.scorer, resized_shape(h, w, self.resize_short), self.max_memory):
            return problem  # checked before the resize, which could need the memory itself
        return resize_short_side(pixels, self.resize_short), (h, w)


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
    arrays: list[tuple[int, np.ndarray]] = []
    files: list[tuple[int, Path]] = []
    for item in items:
        if isinstance(item, torch.Tensor) and item.ndim == 4:
            arrays += [(len(arrays) + len(files), _tensor_to_array(t)) for t in item]
        elif isinstance(item, (torch.Tensor, np.ndarray)):
            arrays.append(
                (len(arrays) + len(files), _tensor_to_array(item) if isinstance(item, torch.Tensor) else item)
            )
        else:
            files.append((len(arrays) + len(files), Path(item)))
    scores = np.empty(len(arrays) + len(files))
    common: dict[str, Any] = dict(batch_size=batch_size, device=device, precision=precision)
    if arrays:
        scores[[i for i, _ in arrays]] = score_arrays(scorer, [a for _, a in arrays], **common)
    if files:
        results = score_paths([p for _, p in files], scorer, **common)
        bad = [r for r in results if r.error]
        if bad:
            raise ScoringError(
                f"cannot read {len(bad)} image(s), first {bad[0].path}: {bad[0].error} — "
                "fix or drop them, or call score_paths() to get per-file errors"
            )
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
