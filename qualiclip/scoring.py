"""Scoring images with a QualiCLIP: the user API, and the one import for every scoring name.

Three entry points, from the lowest level up:

- `score_arrays(model, images)`: decoded images already in memory (`qualiclip.batching`).
- `score_paths(paths, model)`: image files, streamed (at most ``batch_size`` decoded images are
  held at once), batched by equal size across the whole list, unreadable files reported per file
  (`qualiclip.file_scoring`).
- `score_images(items, model)`: the user API; paths, arrays and tensors mixed (here).

Every image is checked before it is scored (`image_problem`, `qualiclip.memory`): at least the
encoder's minimum side, and an estimated peak memory within a budget (``max_memory``, default
half the memory of the scoring device). `score_paths` reports a failed check per file; the
others raise. All of them score with an *inference copy* of the model (`inference_copy`, or
`load_scorer` straight from a checkpoint: `qualiclip.inference`).

The names of those modules are importable from here too, as they were before the split.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .batching import DEFAULT_MAX_BATCH_PIXELS as DEFAULT_MAX_BATCH_PIXELS
from .batching import PRECISIONS as PRECISIONS
from .batching import plan_batches as plan_batches
from .batching import score_arrays as score_arrays
from .batching import scoring_device as scoring_device
from .checkpoint import load_checkpoint
from .file_scoring import FileScore as FileScore
from .file_scoring import probe_size as probe_size
from .file_scoring import resize_short_side as resize_short_side
from .file_scoring import resized_shape as resized_shape
from .file_scoring import score_paths as score_paths
from .inference import encoder_scorer as encoder_scorer
from .inference import fold_batchnorm as fold_batchnorm
from .inference import inference_copy as inference_copy
from .inference import is_inference_copy as is_inference_copy
from .inference import load_scorer as load_scorer
from .memory import ACTIVATION_FACTOR as ACTIVATION_FACTOR
from .memory import DEFAULT_MEMORY_FRACTION as DEFAULT_MEMORY_FRACTION
from .memory import INPUT_BYTES_PER_PIXEL as INPUT_BYTES_PER_PIXEL
from .memory import MEMORY_OPTION as MEMORY_OPTION
from .memory import MIN_MEMORY_BUDGET as MIN_MEMORY_BUDGET
from .memory import ScoringError as ScoringError
from .memory import bytes_per_pixel as bytes_per_pixel
from .memory import default_memory_budget as default_memory_budget
from .memory import device_memory as device_memory
from .memory import gigabytes as gigabytes
from .memory import image_problem as image_problem
from .memory import memory_budget as memory_budget
from .model import QualiCLIP


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
