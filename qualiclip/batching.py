"""Scoring decoded images in batches: images of equal size share a batch, at full resolution.

`score_arrays(model, images)` checks every image first (shape; `memory.image_problem`), then
scores with the inference copy (`inference.inference_copy`) in batches that `plan_batches`
groups by equal size, within ``batch_size`` images and ``max_batch_pixels`` pixels.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from .device import resolve_device
from .inference import inference_copy
from .memory import ScoringError, image_problem, memory_budget
from .model import QualiCLIP

PRECISIONS = ("fp32", "bf16", "fp16")
# A batch holds at most this many pixels: RN50 at 1024x768 then runs one image per batch (peak RSS
# ~1.4 GB); bigger batches gain little on a CPU and raise the peak memory (docs/evaluation.md).
DEFAULT_MAX_BATCH_PIXELS = 800_000


def precision_autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device``; `ScoringError` for one it cannot run."""
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
    amp = precision_autocast(device, precision)  # validates precision before any work
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
