"""Checkpoints that carry what is needed to use them (STYLE.md §6).

A checkpoint is a folder: ``model.safetensors`` (the whole CLIP, text tower included, plus the
prompt features), ``config.json`` (model config, open_clip architecture, preprocessing, prompts)
and ``metadata.json`` (step, params hash, metrics, anything readable). The official QualiCLIP
format (``clip_model.``-prefixed state dict + ``prompts_features``) is imported and exported too.

This module is the one reader of checkpoints: `load_checkpoint` (the whole model, to train,
evaluate or export) and `load_image_encoder` (the image encoder alone, read without building
the text tower: the memory-saving path scoring uses).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .model import (
    ModelConfig, ModelLoadError, QualiCLIP, check_state_dict, create_model, register_model_configs, weights_loaded_next,
)
from .prompts import CLIP_MEAN, CLIP_STD, PROMPT_PAIRS

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METADATA = "metadata.json"
TRAIN_STATE = "train_state.pt"


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


def read_model_config(path: Path) -> tuple[ModelConfig, dict]:
    """The model config of a checkpoint folder, and its whole ``config.json``."""
    config = json.loads((Path(path) / CONFIG).read_text())
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in config["model"].items() if k in fields}), config


def _load_folder(path: Path) -> QualiCLIP:
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ModelLoadError(f"{path} is not a qualiclip checkpoint (needs {CONFIG} and {WEIGHTS})")
    cfg, config = read_model_config(path)
    _ensure_architecture(cfg.name, config.get("open_clip_config"))
    with weights_loaded_next():
        clip = open_clip.create_model(cfg.name, pretrained=None)
    state = load_file(str(path / WEIGHTS))
    prompts = state.pop("prompt_features")
    state = {k.removeprefix("clip."): v for k, v in state.items()}
    check_state_dict(clip, state, source=str(path), name=cfg.name)
    clip.load_state_dict(state)
    return QualiCLIP(clip, prompts, cfg)


def _ensure_architecture(name: str, arch: dict | None) -> None:
    """Register an architecture stored in a checkpoint if open_clip does not know it here."""
    register_model_configs()
    if name in open_clip.list_models():
        return
    if not arch:
        raise ModelLoadError(f"architecture '{name}' is unknown to open_clip and not stored in the checkpoint")
    folder = Path(tempfile.mkdtemp(prefix="qualiclip-arch-"))
    (folder / f"{name}.json").write_text(json.dumps(arch))
    open_clip.add_model_config(folder)


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
    cfg, _ = read_model_config(path)
    if cfg.name not in open_clip.list_models():
        return None
    with torch.device("meta"), weights_loaded_next():  # shapes only: no memory for either tower
        visual = open_clip.create_model(cfg.name, pretrained=None, device="meta").visual
    state, prompts = _read_image_tower(path / WEIGHTS)
    check_state_dict(visual, state, source=str(path), name=cfg.name)
    visual.load_state_dict(state, strict=True, assign=True)
    return visual, prompts, cfg


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}


def _read_image_tower(weights: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The ``clip.visual.*`` tensors (prefix removed) and ``prompt_features`` of a checkpoint file.

    Read with plain file reads into private memory rather than through safetensors' memory map:
    mapped pages, once touched, stay counted in the resident memory next to the folded copies
    (about +150 MB of peak RSS for RN50). The format is an 8-byte header length, a JSON header
    ``{name: {dtype, shape, data_offsets}}``, then the data.
    """
    if not weights.is_file():
        raise ModelLoadError(f"{weights} not found — the checkpoint folder is incomplete; re-run the train stage")
    prefix = "clip.visual."
    with open(weights, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        wanted = [k for k in header if k.startswith(prefix) or k == "prompt_features"]
        tensors = {k: _read_tensor(f, 8 + size, header[k]) for k in wanted}
    prompts = tensors.pop("prompt_features")
    return {k[len(prefix):]: v for k, v in tensors.items()}, prompts


def _read_tensor(f, base: int, meta: dict) -> torch.Tensor:
    start, end = meta["data_offsets"]
    buf = bytearray(end - start)
    f.seek(base + start)
    f.readinto(buf)
    dtype = _SAFETENSORS_DTYPES[meta["dtype"]]
    return torch.frombuffer(buf, dtype=dtype).reshape(meta["shape"]) if buf else torch.empty(meta["shape"], dtype=dtype)


def read_metadata(path: Path) -> dict:
    meta = Path(path) / METADATA
    return json.loads(meta.read_text()) if meta.is_file() else {}


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
