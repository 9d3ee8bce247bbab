"""Checkpoints that carry what is needed to use them.

A checkpoint is a folder: ``model.safetensors`` (the whole CLIP, text tower included, plus the
prompt features), ``config.json`` (model config, open_clip architecture, preprocessing, prompts)
and ``metadata.json`` (step, params hash, metrics, anything readable). The official QualiCLIP
format (``clip_model.``-prefixed state dict + ``prompts_features``) is imported and exported too.

This module is the one reader of checkpoints: `load_checkpoint` (the whole model, to train,
evaluate or export) and `load_image_encoder` (the image encoder alone, read without building
the text tower: the memory-saving path scoring uses).

Nothing read from a checkpoint is trusted before it is checked: the safetensors header
(`weights.read_safetensors_header`) before any tensor is allocated, ``config.json``
(`read_config`) before any model is built, and an architecture stored in it against
`ARCH_LIMITS` and `MAX_PARAMETERS` (counted on the meta device) before it is registered with
open_clip.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file
from torch import nn

from .config import ConfigError, build_config
from .files import FileReadError, read_regular
from .model import (
    ModelConfig,
    QualiCLIP,
    create_model,
    register_model_configs,
    uses_quick_gelu,
    weights_loaded_next,
)
from .prompts import CLIP_MEAN, CLIP_STD, PROMPT_PAIRS
from .weights import SAFETENSORS_DTYPES, ModelLoadError, check_state_dict, load_safetensors, read_safetensors_header

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METADATA = "metadata.json"
TRAIN_STATE = "train_state.pt"
MAX_JSON_BYTES = 16 << 20  # config.json / metadata.json: a few KB in practice
# Limits on an architecture stored in a checkpoint's config.json: building a model allocates its
# weights, so a config that declares a huge one is refused before anything is built. Each cap is
# about 4x the largest value among open_clip 3.3's own configs (in brackets).
ARCH_LIMITS: dict[str, int] = {
    "embed_dim": 8192,  # [1536: ViT-gopt-16-SigLIP2-384]
    "vision_cfg.width": 8192,  # [1792: ViT-e-14]
    "vision_cfg.layers": 256,  # [56: ViT-e-14; ResNet stages summed: 64, RN50x64]
    "vision_cfg.image_size": 2048,  # [512: ViT-B-16-SigLIP2-512]
    "vision_cfg.head_width": 1024,  # [112: ViT-e-14]
    "vision_cfg.mlp_ratio": 64,  # [8.6: ViT-e-14]
    "text_cfg.width": 8192,  # [1280: ViT-bigG-14]
    "text_cfg.layers": 256,  # [36: ViT-e-14]
    "text_cfg.heads": 256,  # [20: PE-Core-bigG-14-448]
    "text_cfg.mlp_ratio": 64,  # [4]
    "text_cfg.context_length": 4096,  # [77]
    "text_cfg.vocab_size": 4_000_000,  # [901,629: ViT-bigG-14-worldwide]
}
MAX_PARAMETERS = 10_000_000_000  # about 2x ViT-e-14 (4.6 B), the largest CLIP open_clip knows
_ARCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # becomes a file name when registered
_REGISTERED: dict[str, dict] = {}  # architectures this process registered from checkpoints


def save_checkpoint(model: QualiCLIP, out_dir: Path, metadata: dict | None = None) -> Path:
    """Write the checkpoint folder atomically: a complete folder or none at all."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    state = {f"clip.{k}": v.detach().cpu().contiguous() for k, v in model.clip.state_dict().items()}
    state["prompt_features"] = model.prompt_features.detach().cpu().contiguous()
    save_file(state, str(tmp / WEIGHTS))
    config = {
        "model": dataclasses.asdict(model.cfg),
        "open_clip_config": open_clip.get_model_config(model.cfg.name),
        "preprocess": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "resize": None},
        "prompt_pairs": [list(p) for p in PROMPT_PAIRS],
    }
    (tmp / CONFIG).write_text(json.dumps(config, indent=2))
    (tmp / METADATA).write_text(json.dumps(metadata or {}, indent=2, sort_keys=True, default=str))
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def load_checkpoint(path: str | Path, *, name: str = "RN50") -> QualiCLIP:
    """Load a checkpoint folder of this project, or an official QualiCLIP ``.pth`` file.

    ``name`` is the architecture of an official file (the authors released RN50 only).
    """
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if path.is_file():
        return create_model(ModelConfig(name=name, pretrained=str(path)))
    raise ModelLoadError(f"no checkpoint at {path} — run the train stage first or pass an existing path")


def _load_folder(path: Path) -> QualiCLIP:
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ModelLoadError(f"{path} is not a qualiclip checkpoint (needs {CONFIG} and {WEIGHTS})")
    cfg, arch = read_config(path)
    _ensure_architecture(cfg.name, arch, path / CONFIG)
    with weights_loaded_next():  # the activation of the weights it started from (model.uses_quick_gelu)
        clip = open_clip.create_model(
            cfg.name, pretrained=None, force_quick_gelu=uses_quick_gelu(cfg.name, cfg.pretrained)
        )
    state = load_safetensors(path / WEIGHTS)
    if "prompt_features" not in state:
        raise ModelLoadError(
            f"{path / WEIGHTS} holds no prompt_features — it is not a qualiclip checkpoint; re-run the train stage"
        )
    prompts = state.pop("prompt_features")
    state = {k.removeprefix("clip."): v for k, v in state.items()}
    check_state_dict(clip, state, source=str(path), name=cfg.name)
    clip.load_state_dict(state)
    return QualiCLIP(clip, prompts, cfg)


def read_config(path: Path) -> tuple[ModelConfig, dict | None]:
    """``config.json`` of the checkpoint folder ``path``: (model config, stored open_clip architecture).

    `ModelLoadError` naming the file when it is not a regular file of valid JSON, lacks a
    ``model`` mapping with a ``name``, or holds values of the wrong type.
    """
    file = Path(path) / CONFIG
    config = _read_json(file)
    model = config.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise ModelLoadError(
            f"{file} has no 'model' section with a 'name' — the checkpoint is damaged; re-run the train stage"
        )
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        cfg = build_config(ModelConfig, {k: v for k, v in model.items() if k in fields}, where="model")
    except ConfigError as exc:
        raise ModelLoadError(f"{file}: {exc} — the checkpoint is damaged; re-run the train stage") from None
    arch = config.get("open_clip_config")
    if arch is not None and not isinstance(arch, dict):
        raise ModelLoadError(f"{file}: open_clip_config must be a mapping, got {type(arch).__name__}")
    return cfg, arch


def _read_json(file: Path) -> dict:
    """A JSON object from a small regular file, or `ModelLoadError` naming the file."""
    try:
        value = json.loads(read_regular(file, max_bytes=MAX_JSON_BYTES))
    except FileReadError as exc:
        raise ModelLoadError(f"{file}: {exc.detail}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ModelLoadError(
            f"{file} is not valid JSON ({exc}) — the checkpoint is damaged (truncated?); "
            "re-run the train stage or restore the file"
        ) from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{file} must hold a JSON object, got {type(value).__name__}")
    return value


def _ensure_architecture(name: str, arch: dict | None, source: Path) -> None:
    """Register an architecture stored in a checkpoint if open_clip does not know it here.

    A stored architecture is checked (`check_architecture`) before it is registered; one this
    process registered before is checked again when another checkpoint stores it differently.
    """
    register_model_configs()
    if name in open_clip.list_models() and (name not in _REGISTERED or _REGISTERED[name] == arch):
        return
    if not arch:
        raise ModelLoadError(f"architecture '{name}' is unknown to open_clip and not stored in the checkpoint")
    check_architecture(name, arch, source)
    folder = Path(tempfile.mkdtemp(prefix="qualiclip-arch-"))
    (folder / f"{name}.json").write_text(json.dumps(arch))
    open_clip.add_model_config(folder)
    _REGISTERED[name] = arch


def check_architecture(name: str, arch: dict, source: Path) -> None:
    """`ModelLoadError` unless ``arch`` (an open_clip model config) is within `ARCH_LIMITS` and
    builds, on the meta device (nothing allocated), with at most `MAX_PARAMETERS` parameters."""
    if not _ARCH_NAME.fullmatch(name) or ".." in name:
        raise ModelLoadError(f"{source}: architecture name {name!r} is not a plain name (letters, digits, _ . + -)")
    for key, limit in ARCH_LIMITS.items():
        value = _declared(arch, key, source)
        if value > limit:
            raise ModelLoadError(
                f"{source}: architecture '{name}' declares {key} = {value}, above the limit of "
                f"{limit} — the config is damaged or not a CLIP this project can load"
            )
    folder = Path(tempfile.mkdtemp(prefix="qualiclip-arch-check-"))
    try:
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": arch}))
        with torch.device("meta"):
            model = open_clip.create_model(f"local-dir:{folder}", device="meta")
    except Exception as exc:  # open_clip raises whatever its constructors raise for a bad config
        raise ModelLoadError(f"{source}: architecture '{name}' cannot be built ({type(exc).__name__}: {exc})") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_PARAMETERS:
        raise ModelLoadError(
            f"{source}: architecture '{name}' has {n:,} parameters, above the limit of "
            f"{MAX_PARAMETERS:,} — the config is damaged or not a CLIP this project can load"
        )


def _declared(arch: dict, key: str, source: Path) -> float:
    """The value of a dotted ``key`` in ``arch`` as one number (lists: summed; absent: 0)."""
    value: object = arch
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    items = value if isinstance(value, (list, tuple)) else [value]
    if not all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)) for v in items
    ):
        raise ModelLoadError(f"{source}: {key} must be a number or a list of numbers, got {value!r}")
    return sum(v for v in items if v is not None)  # type: ignore[misc]  # numbers, checked above


def load_image_encoder(path: str | Path) -> tuple[nn.Module, torch.Tensor, ModelConfig] | None:
    """The image encoder, prompt features and model config of a checkpoint folder, or None.

    Only the image encoder's tensors and the prompt features are read (the encoder is built on
    the meta device, then given the stored tensors), so the peak memory is that of the image
    encoder, not of the whole CLIP: for RN50, ~150 MB instead of ~560 MB. None for anything else
    (an official ``.pth``, an architecture that only the checkpoint stores): `load_checkpoint` it.
    """
    path = Path(path)
    register_model_configs()
    if not (path / CONFIG).is_file():
        return None
    cfg = read_config(path)[0]
    if cfg.name not in open_clip.list_models():
        return None
    with torch.device("meta"), weights_loaded_next():  # shapes only: no memory for either tower
        visual = open_clip.create_model(cfg.name, pretrained=None, device="meta").visual
    state, prompts = _read_image_tower(path / WEIGHTS)
    check_state_dict(visual, state, source=str(path), name=cfg.name)
    visual.load_state_dict(state, strict=True, assign=True)
    return visual, prompts, cfg


def _read_image_tower(weights: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The ``clip.visual.*`` tensors (prefix removed) and ``prompt_features`` of a checkpoint file.

    Read with plain file reads into private memory rather than through safetensors' memory map:
    mapped pages, once touched, stay counted in the resident memory next to the folded copies
    (about +150 MB of peak RSS for RN50). The header is checked first (`read_safetensors_header`).
    """
    if not weights.is_file():
        raise ModelLoadError(f"{weights} not found — the checkpoint folder is incomplete; re-run the train stage")
    prefix = "clip.visual."
    header = read_safetensors_header(weights)
    if "prompt_features" not in header.tensors:
        raise ModelLoadError(
            f"{weights} holds no prompt_features — it is not a qualiclip checkpoint; re-run the train stage"
        )
    with open(weights, "rb") as f:
        wanted = [k for k in header.tensors if k.startswith(prefix) or k == "prompt_features"]
        tensors = {k: _read_tensor(f, header.data_start, header.tensors[k]) for k in wanted}
    prompts = tensors.pop("prompt_features")
    return {k[len(prefix) :]: v for k, v in tensors.items()}, prompts


def _read_tensor(f, base: int, meta: dict) -> torch.Tensor:
    start, end = meta["data_offsets"]
    buf = bytearray(end - start)
    f.seek(base + start)
    f.readinto(buf)
    dtype = SAFETENSORS_DTYPES[meta["dtype"]][0]
    return torch.frombuffer(buf, dtype=dtype).reshape(meta["shape"]) if buf else torch.empty(meta["shape"], dtype=dtype)


def read_metadata(path: Path) -> dict:
    meta = Path(path) / METADATA
    return _read_json(meta) if meta.is_file() else {}


def export_official(model: QualiCLIP, out_file: Path) -> Path:
    """Write the official format: ``clip_model.``-prefixed CLIP state dict + ``prompts_features``."""
    state = {f"clip_model.{k}": v.detach().cpu() for k, v in model.clip.state_dict().items()}
    state["prompts_features"] = model.prompt_features.detach().cpu()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out_file)
    return out_file


# ---------------------------------------------------------------------------------------------
# Resumable train state (optimizer, scheduler, step, RNG, log): torch.save in, weights_only out


def save_train_state(state: dict, path: Path) -> Path:
    """Write ``state`` atomically: a temporary file in the same folder, fsync, then ``os.replace``.

    A process killed at any moment leaves either the previous complete file or the new one,
    never a torn file. ``state`` may hold only what ``torch.load(weights_only=True)`` accepts:
    tensors, numbers, strings, None, and lists/tuples/dicts of them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_train_state(path: Path) -> dict | None:
    """The train state at ``path`` (loaded with ``weights_only=True``), or None if there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"train state {path} is unreadable ({type(exc).__name__}: {exc}). "
            "Fix: delete it to restart training from step 0, or set train.resume: false."
        ) from None
