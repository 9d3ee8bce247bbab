"""The QualiCLIP model: an open_clip CLIP whose image encoder is scored against antonym prompts.

Score of an image (docs/method.md, "The scoring formula"): for each prompt pair k,
``p_k = softmax(scale · [cos(f, t_k+), cos(f, t_k−)])[0]``; quality ``q = mean_k p_k`` in [0, 1].
The model carries its preprocessing (CLIP mean/std) and its prompt features, so callers pass
RGB in [0, 1] at any resolution.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import huggingface_hub.constants
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .errors import QualiclipError
from .files import FileReadError, open_regular
from .prompts import CLIP_MEAN, CLIP_STD, PROMPT_PAIRS, flat_prompts
from .schema import TINY_MODEL
from .schema import ModelConfig as ModelConfig

# open_clip's modules, read attribute by attribute: typed as Any, because torch types a submodule
# or buffer reached through `nn.Module.__getattr__` as `Tensor | Module`, which fits no use here.
OpenClipModule = Any

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
PAPER_MODEL = ("RN50", "openai")
MIN_SIDE = 32  # ModifiedResNet downsamples by 32; smaller inputs pool to an empty map
# A score is a mean of softmax probabilities of the positive prompt (score_from_similarities):
SCORE_RANGE = (0.0, 1.0)
HIGHER_IS_BETTER = True
# safetensors dtype names -> (torch dtype, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on the JSON header


class ModelLoadError(QualiclipError, RuntimeError):
    """Weights or architecture that cannot be loaded; the message names the fix."""


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


# ---------------------------------------------------------------------------------------------
# Weight files


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a torch file loaded with ``weights_only=True``."""
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} not found — check model.pretrained in params.yaml")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"{path} is not a plain weights file ({type(exc).__name__}); only state dicts are loaded "
            "(weights_only=True), never pickled code. Convert it to a state dict or .safetensors."
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path} holds a {type(obj).__name__}, expected a state dict")
    return obj


@dataclass(frozen=True)
class SafetensorsHeader:
    """The checked tensor table of a .safetensors file: ``{name: {dtype, shape, data_offsets}}``;
    offsets count from ``data_start``, the first byte after the header."""

    tensors: dict[str, dict]
    data_start: int


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """The tensor table of ``path``, checked before any tensor is read or allocated.

    Checked: a regular file; an 8-byte little-endian header length within the file and
    `MAX_HEADER_BYTES`; a JSON object whose entries (``__metadata__`` aside) each have a dtype
    of `SAFETENSORS_DTYPES`, a shape of non-negative ints and data offsets that tile the data
    section exactly, in bytes matching their shape. `ModelLoadError` naming the file otherwise.
    """
    path = Path(path)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
                raise _damaged(path, f"its header length {n} does not fit a file of {size} bytes")
            raw = f.read(n)
    except OSError as exc:  # FileReadError: not a regular file, a loop, ...; else a read error
        raise ModelLoadError(f"{path}: {exc.detail if isinstance(exc, FileReadError) else exc}") from None
    try:
        header = json.loads(raw)
    except ValueError:
        raise _damaged(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a JSON object")
    header.pop("__metadata__", None)
    _check_tensor_table(path, header, size - 8 - n)
    return SafetensorsHeader(header, 8 + n)


def _check_tensor_table(path: Path, header: dict, data_bytes: int) -> None:
    end = 0
    entries = sorted(header.items(), key=lambda kv: _offsets(path, kv[0], kv[1]))
    for name, entry in entries:
        start, stop = _offsets(path, name, entry)
        dtype, shape = entry.get("dtype"), entry.get("shape")
        if (
            dtype not in SAFETENSORS_DTYPES
            or not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise _damaged(path, f"tensor {name!r} has dtype {dtype!r} and shape {shape!r}")
        if start != end or stop - start != math.prod(shape) * SAFETENSORS_DTYPES[dtype][1]:
            raise _damaged(path, f"tensor {name!r}: data offsets {[start, stop]} do not match its shape or neighbours")
        end = stop
    if end != data_bytes:
        raise _damaged(path, f"the tensors cover {end} of its {data_bytes} data bytes")


def _offsets(path: Path, name: str, entry) -> tuple[int, int]:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise _damaged(path, f"tensor {name!r} has data offsets {offsets!r}")
    return offsets[0], offsets[1]


def _damaged(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path} is not a valid safetensors file: {what} — the file is damaged or of another "
        "format; re-run the train stage or restore it"
    )


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, after `read_safetensors_header` has checked it."""
    read_safetensors_header(path)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise _damaged(Path(path), f"{type(exc).__name__}: {exc}") from None


def load_weights_file(clip: nn.Module, path: Path, name: str) -> torch.Tensor | None:
    """Load ``path`` into ``clip`` after checking it fits; return official prompt features if present."""
    state = read_state_dict(path)
    prompts = state.pop("prompts_features", None)
    state = {_strip_prefix(k): v for k, v in state.items()}
    check_state_dict(clip, state, source=str(path), name=name)
    clip.load_state_dict(state, strict=True)
    return prompts


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "clip_model.", "clip."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], *, source: str, name: str) -> None:
    """Raise `ModelLoadError` naming the mismatch if ``state`` does not fit ``module`` exactly."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} tensors differ in shape (e.g. {k}: file {tuple(state[k].shape)} vs model {expected[k]})"
        )
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    raise ModelLoadError(
        f"weights in {source} do not match architecture '{name}': "
        + "; ".join(parts)
        + ". Fix: set model.name to the architecture these weights were trained with."
    )
