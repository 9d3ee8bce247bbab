"""The QualiCLIP model: an open_clip CLIP whose image encoder is scored against antonym prompts.

Score of an image (docs/method.md, "The scoring formula"): for each prompt pair k,
``p_k = softmax(scale · [cos(f, t_k+), cos(f, t_k−)])[0]``; quality ``q = mean_k p_k`` in [0, 1].
The model carries its preprocessing (CLIP mean/std) and its prompt features, so callers pass
RGB in [0, 1] at any resolution.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import huggingface_hub.constants
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .prompts import CLIP_MEAN, CLIP_STD, PROMPT_PAIRS, flat_prompts
from .schema import TINY_MODEL
from .schema import ModelConfig as ModelConfig
from .weights import MAX_HEADER_BYTES as MAX_HEADER_BYTES  # the weight-file names, importable here as before
from .weights import SAFETENSORS_DTYPES as SAFETENSORS_DTYPES
from .weights import ModelLoadError as ModelLoadError
from .weights import SafetensorsHeader as SafetensorsHeader
from .weights import check_state_dict as check_state_dict
from .weights import load_safetensors as load_safetensors
from .weights import load_weights_file as load_weights_file
from .weights import read_safetensors_header as read_safetensors_header
from .weights import read_state_dict as read_state_dict

# open_clip's modules, read attribute by attribute: typed as Any, because torch types a submodule
# or buffer reached through `nn.Module.__getattr__` as `Tensor | Module`, which fits no use here.
OpenClipModule = Any

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
PAPER_MODEL = ("RN50", "openai")
MIN_SIDE = 32  # ModifiedResNet downsamples by 32; smaller inputs pool to an empty map
# A score is a mean of softmax probabilities of the positive prompt (score_from_similarities):
SCORE_RANGE = (0.0, 1.0)
HIGHER_IS_BETTER = True


def register_model_configs() -> None:
    """Make the project's tiny open_clip configs known to open_clip (idempotent)."""
    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


class AttentionPool(nn.Module):
    """open_clip's ModifiedResNet attention pool with the positional embedding dropped or resized.

    Dropping it (the paper's choice) makes the encoder work at any input resolution. The
    parameters are the wrapped pool's own, so state-dict keys stay identical.
    """

    def __init__(self, pool: OpenClipModule, mode: str):
        super().__init__()
        self.positional_embedding = pool.positional_embedding
        self.q_proj, self.k_proj, self.v_proj, self.c_proj = pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj
        self.num_heads = pool.num_heads
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x = x.flatten(2).permute(2, 0, 1)  # (HW, N, C)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (HW+1, N, C)
        if self.mode == "interpolate":
            x = x + resized_positional_embedding(self.positional_embedding, h, w).to(x.dtype)[:, None, :]
        out, _ = F.multi_head_attention_forward(
            query=x[:1],
            key=x,
            value=x,
            embed_dim_to_check=c,
            num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight,
            k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=0.0,
            out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True,
            training=self.training,
            need_weights=False,
        )
        return out[0]  # (N, output_dim)


def resized_positional_embedding(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(1 + S*S, C) embedding of an S x S grid -> (1 + h*w, C): the grid resized bicubically."""
    side = int(round((pos.shape[0] - 1) ** 0.5))
    grid = pos[1:].T.reshape(1, -1, side, side)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], grid.reshape(pos.shape[1], h * w).T], dim=0)


class QualiCLIP(nn.Module):
    """CLIP image encoder + frozen prompt features. Input: RGB in [0,1], (N, 3, H, W)."""

    prompt_features: torch.Tensor  # buffers, registered in __init__
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, clip: OpenClipModule, prompt_features: torch.Tensor, cfg: ModelConfig):
        super().__init__()
        self.clip = clip
        self.cfg = cfg
        if hasattr(clip.visual, "attnpool"):
            clip.visual.attnpool = AttentionPool(clip.visual.attnpool, cfg.pos_embedding)
        for p in clip.parameters():
            p.requires_grad_(False)
        for p in clip.visual.parameters():
            p.requires_grad_(True)
        if isinstance(getattr(clip.visual, "attnpool", None), AttentionPool) and cfg.pos_embedding == "drop":
            # unused when dropped: frozen so it has no optimizer state and DDP sees no unused parameter
            clip.visual.attnpool.positional_embedding.requires_grad_(False)
        _check_prompt_features(prompt_features, getattr(clip.visual, "output_dim", None), cfg.name)
        self.register_buffer("prompt_features", F.normalize(prompt_features.float(), dim=-1))  # (2K, D)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def visual(self) -> OpenClipModule:
        return self.clip.visual

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """RGB in [0,1] (or uint8) -> CLIP-normalised input, same shape, float dtype."""
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def encode(self, x: torch.Tensor, encoder: nn.Module | None = None) -> torch.Tensor:
        """(N, 3, H, W) in [0,1] (or uint8) -> L2-normalised float32 image features (N, D).

        ``encoder`` replaces ``self.visual`` for the forward pass; training passes its
        DistributedDataParallel / compiled wrapper of the same module. An encoder with
        ``normalizes_input`` (the scoring `FastEncoder`) gets the pixels as they are.
        """
        encoder = encoder if encoder is not None else self.clip.visual
        if min(x.shape[-2:]) < self.min_side:
            raise ValueError(
                f"image of {x.shape[-2]}x{x.shape[-1]} px: a ResNet image encoder needs at least {MIN_SIDE} px "
                "on each side (five stride-2 stages). Fix: upscale small images before scoring."
            )
        x = x if getattr(encoder, "normalizes_input", False) else self.normalize(x)
        return F.normalize(encoder(x).float(), dim=-1)

    @property
    def min_side(self) -> int:
        """The shortest image side the encoder takes: `MIN_SIDE` for a ResNet (the training module
        or the scoring `FastEncoder`, which declares its own), else 1."""
        visual = self.clip.visual
        resnet = isinstance(getattr(visual, "attnpool", None), AttentionPool)
        return getattr(visual, "min_side", MIN_SIDE if resnet else 1)

    def similarities(self, x: torch.Tensor, encoder: nn.Module | None = None) -> torch.Tensor:
        """Raw cosine similarities to every prompt, (N, K, 2) with [..., 0] the positive prompt."""
        feats = self.encode(x, encoder)  # (N, D)
        with torch.autocast(feats.device.type, enabled=False):  # cosines in float32 even under autocast
            return (feats @ self.prompt_features.T).view(feats.shape[0], -1, 2)

    def score_from_similarities(self, sims: torch.Tensor) -> torch.Tensor:
        """(N, K, 2) cosines -> quality (N,) in [0,1], higher is better, in float64.

        The softmax runs in float64: at scale 100 a cosine gap above ~0.16 puts float32's
        probability within one ulp of 1, and distinct images would tie (a from-scratch model
        reaches gaps of 0.3; the ties cut its synthetic within-photo SRCC from 0.91 to 0.83).
        """
        if sims.device.type == "mps":  # no float64 on Apple GPUs
            sims = sims.cpu()
        return torch.softmax(self.cfg.logit_scale * sims.double(), dim=-1)[..., 0].mean(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_from_similarities(self.similarities(x))

    def visual_train_mode(self, bn_frozen: bool) -> QualiCLIP:
        """Train mode for the image encoder; BatchNorm statistics frozen if asked."""
        self.eval()
        self.clip.visual.train()
        if bn_frozen:
            for m in self.clip.visual.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def _check_prompt_features(features: torch.Tensor, dim: int | None, name: str) -> None:
    """Prompt features must be (2K, D): K positive/negative rows interleaved, D the image feature size."""
    ok = features.ndim == 2 and features.shape[0] % 2 == 0 and features.shape[0] > 0
    if ok and dim is not None:
        ok = features.shape[1] == dim
    if not ok:
        raise ModelLoadError(
            f"prompt features of shape {tuple(features.shape)} do not fit '{name}' (expected (2K, {dim})). "
            "Fix: use a checkpoint made for this architecture, or drop 'prompts_features' from the file "
            "so they are recomputed from the text encoder."
        )


# ---------------------------------------------------------------------------------------------
# Building


def create_model(cfg: ModelConfig, prompt_pairs=PROMPT_PAIRS) -> QualiCLIP:
    """Build a QualiCLIP from its config: backbone, weights, and prompt features computed once."""
    clip, official_prompts = create_clip(cfg)
    features = official_prompts if official_prompts is not None else encode_prompts(clip, cfg.name, prompt_pairs)
    return QualiCLIP(clip, features, cfg)


def create_clip(cfg: ModelConfig) -> tuple[nn.Module, torch.Tensor | None]:
    """The open_clip CLIP for ``cfg`` and, for an official QualiCLIP file, its stored prompt features."""
    register_model_configs()
    if cfg.name not in open_clip.list_models():
        close = difflib.get_close_matches(cfg.name, open_clip.list_models(), n=3)
        raise ModelLoadError(f"unknown model '{cfg.name}' — did you mean {close}? (see open_clip.list_models())")
    pretrained = cfg.pretrained
    if pretrained is None:
        torch.manual_seed(cfg.seed)  # from-scratch init is part of the seeded run
        with weights_loaded_next():  # random init is what `pretrained: null` asks for: the warning tells nothing
            return open_clip.create_model(cfg.name, pretrained=None), None
    if _looks_like_path(pretrained):
        torch.manual_seed(cfg.seed)
        with weights_loaded_next():
            clip = open_clip.create_model(
                cfg.name, pretrained=None, force_quick_gelu=uses_quick_gelu(cfg.name, pretrained)
            )
        prompts = load_weights_file(clip, Path(pretrained), cfg.name)
        return clip, prompts
    return _create_from_tag(cfg.name, pretrained), None


def _looks_like_path(value: str) -> bool:
    return value.endswith((".pt", ".pth", ".bin", ".safetensors")) or os.sep in value or Path(value).exists()


def uses_quick_gelu(name: str, pretrained: str | None) -> bool:
    """Whether the weights ``pretrained`` names were trained with QuickGELU, as OpenAI's CLIPs were.

    open_clip's plain configs (``RN50``) build the text tower with GELU and only warn when a tag's
    weights want QuickGELU; the prompt features (and QualiCLIP+'s learnt prompts) would then differ
    from OpenAI's and pyiqa's. A tag says so in its pretrained config; a weights file of a model
    whose every open_clip tag is a QuickGELU one (RN50: openai, yfcc15m, cc12m; the official
    QualiCLIP file) is taken to be one too. From scratch: the config's own activation."""
    if pretrained is None:
        return False
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        return bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu"))
    flags = {bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu")) for tag in tags}
    return flags == {True}


def _create_from_tag(name: str, tag: str) -> nn.Module:
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        raise ModelLoadError(f"model '{name}' has no pretrained tag '{tag}'; available: {tags or 'none'}")
    offline = huggingface_hub.constants.HF_HUB_OFFLINE or not hub_reachable()
    # Offline, open_clip would retry downloads for about a minute; with the hub flag set it
    # uses a cached copy or fails at once.
    with hub_offline(offline):
        try:
            return open_clip.create_model(name, pretrained=tag, force_quick_gelu=uses_quick_gelu(name, tag))
        except Exception as exc:  # open_clip raises RuntimeError, hub raises its own errors
            raise ModelLoadError(
                f"cannot load pretrained weights '{tag}' for {name}: "
                + ("no internet and no cached copy. " if offline else f"{exc}. ")
                + "Fix: set model.pretrained in params.yaml to a local .pt/.pth/.safetensors file "
                "(an open_clip state dict, or the official QualiCLIP checkpoint), or run once with internet "
                "so the weights are cached."
            ) from exc


class _RandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def weights_loaded_next() -> Iterator[None]:
    """Silence open_clip's "No pretrained weights loaded ... Model initialized randomly" inside the block.

    open_clip says so of every model built without a pretrained tag; where stored weights are
    loaded into the model right after, the warning is false, and where ``model.pretrained: null``
    asks for a random init, it is no news. open_clip logs it with
    ``logging.warning``, i.e. on the root logger, so the filter sits there while the block runs.
    """
    quiet = _RandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


@contextlib.contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub's offline switch set to ``offline`` inside the block, then restored.

    open_clip downloads through huggingface_hub, whose functions read the switch when called.
    """
    saved = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = offline
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = saved


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connect within ``timeout`` seconds."""
    host = urlparse(huggingface_hub.constants.ENDPOINT).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def encode_prompts(clip: OpenClipModule, name: str, pairs=PROMPT_PAIRS) -> torch.Tensor:
    """L2-normalised text features of the prompts, (2K, D), in checkpoint row order."""
    tokens = open_clip.get_tokenizer(name)(flat_prompts(pairs))
    was_training = clip.training
    clip.eval()
    with torch.no_grad():
        feats = clip.encode_text(tokens)
    clip.train(was_training)
    return F.normalize(feats.float(), dim=-1)
