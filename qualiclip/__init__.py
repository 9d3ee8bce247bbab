"""qualiclip: train and evaluate QualiCLIP, a CLIP-based opinion-unaware no-reference IQA model.

Importing the package is cheap and has no side effects; the public helpers load on first use:

    >>> from qualiclip import score_images, load_checkpoint
    >>> score_images(["photo.jpg"], "outputs/train/checkpoint")
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "score_images": "qualiclip.scoring",
    "load_checkpoint": "qualiclip.checkpoint",
    "create_model": "qualiclip.model",
    "ModelConfig": "qualiclip.model",
    "list_distortions": "qualiclip.distortions",
    "get_distortion": "qualiclip.distortions",
    "list_datasets": "qualiclip.datasets",
    "load_dataset": "qualiclip.datasets",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qualiclip' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
