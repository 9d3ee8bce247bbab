"""The inference copy: what scoring runs instead of the trained model.

`inference_copy(model)` (or `load_scorer(path)`, straight from a checkpoint) keeps the image
encoder alone, BatchNorm folded into the convolutions, no text tower; a ResNet encoder is rebuilt
as a `fast_encoder.FastEncoder` (fused convolutions, pooled attention, normalisation folded,
uint8 pixels in). It gives the model's scores to float rounding (< 1e-5) and runs faster, with
less memory (figures in docs/evaluation.md). Every scoring entry point (`qualiclip.scoring`)
scores with it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_checkpoint, load_image_encoder
from .fast_encoder import FastEncoder, can_build
from .model import ModelConfig, QualiCLIP
from .prompts import CLIP_MEAN, CLIP_STD


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
