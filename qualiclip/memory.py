"""The memory estimate: whether one image fits the scoring memory budget, before it is scored.

Peak memory of scoring an image = its pixels x `bytes_per_pixel` of the scorer (measured once
per scorer on a probe image); `image_problem` refuses an image above the budget (or below the
encoder's minimum side) with the reason, and `memory_budget` checks the budget itself
(``max_memory`` bytes, ``--max-memory-gb`` on the command line; default half of the scoring
device's memory). Scores stay those of the whole image: nothing is tiled or resized.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import nn

from .errors import QualiclipError
from .model import QualiCLIP

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
