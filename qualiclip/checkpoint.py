"""Checkpoints that carry what is needed to use them (STYLE.md §6).

A checkpoint is a folder: ``model.safetensors`` (the whole CLIP, text tower included, plus the
prompt features), ``config.json`` (model config, open_clip architecture, preprocessing, prompts)
and ``metadata.json`` (step, params hash, metrics, anything readable). The official QualiCLIP
format (``clip_model.``-prefixed state dict + ``prompts_features``) is imported and exported too.

Nothing read from a checkpoint is trusted before it is checked: the safetensors header
(`read_safetensors_header`) before any tensor is allocated, ``config.json`` (`read_config`)
before any model is built, and an architecture stored in it against `ARCH_LIMITS` and
`MAX_PARAMETERS` (counted on the meta device) before it is registered with open_clip.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .model import ModelConfig, ModelLoadError, QualiCLIP, check_state_dict, read_state_dict, register_model_configs
from .prompts import CLIP_MEAN, CLIP_STD, PROMPT_PAIRS

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METADATA = "metadata.json"
TRAIN_STATE = "train_state.pt"

# safetensors dtype names -> (torch dtype, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on the JSON header
MAX_JSON_BYTES = 16 << 20  # config.json / metadata.json: a few KB in practice
# Limits on an architecture stored in a checkpoint's config.json: building a model allocates its
# weights, so a config that declares a huge one is refused before anything is built. Each cap is
# about 4x the largest value among open_clip 3.3's own configs (in brackets).
ARCH_LIMITS: dict[str, int] = {
    "embed_dim": 8192,                 # [1536: ViT-gopt-16-SigLIP2-384]
    "vision_cfg.width": 8192,          # [1792: ViT-e-14]
    "vision_cfg.layers": 256,          # [56: ViT-e-14; ResNet stages summed: 64, RN50x64]
    "vision_cfg.image_size": 2048,     # [512: ViT-B-16-SigLIP2-512]
    "vision_cfg.head_width": 1024,     # [112: ViT-e-14]
    "vision_cfg.mlp_ratio": 64,        # [8.6: ViT-e-14]
    "text_cfg.width": 8192,            # [1280: ViT-bigG-14]
    "text_cfg.layers": 256,            # [36: ViT-e-14]
    "text_cfg.heads": 256,             # [20: PE-Core-bigG-14-448]
    "text_cfg.mlp_ratio": 64,          # [4]
    "text_cfg.context_length": 4096,   # [77]
    "text_cfg.vocab_size": 4_000_000,  # [901,629: ViT-bigG-14-worldwide]
}
MAX_PARAMETERS = 10_000_000_000  # about 2x ViT-e-14 (4.6 B), the largest CLIP open_clip knows
_ARCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # becomes a file name when registered
_REGISTERED: dict[str, dict] = {}  # architectures this process registered from checkpoints


def save_checkpoint(model: QualiCLIP, out_dir: Path, metadata: dict | None = None) -> Path:
    """Write the checkpoint folder atomically: a complete folder or none at all."""
    import open_clip
    from safetensors.torch import save_file

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
        from .model import create_model

        return create_model(ModelConfig(name=name, pretrained=str(path)))
    raise ModelLoadError(f"no checkpoint at {path} — run the train stage first or pass an existing path")


def _load_folder(path: Path) -> QualiCLIP:
    import open_clip

    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ModelLoadError(f"{path} is not a qualiclip checkpoint (needs {CONFIG} and {WEIGHTS})")
    cfg, arch = read_config(path)
    _ensure_architecture(cfg.name, arch, path / CONFIG)
    clip = open_clip.create_model(cfg.name, pretrained=None)
    state = load_safetensors(path / WEIGHTS)
    if "prompt_features" not in state:
        raise ModelLoadError(f"{path / WEIGHTS} holds no prompt_features — it is not a qualiclip checkpoint; "
                             "re-run the train stage")
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
    from .config import ConfigError, build_config

    file = Path(path) / CONFIG
    config = _read_json(file)
    model = config.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise ModelLoadError(f"{file} has no 'model' section with a 'name' — the checkpoint is damaged; "
                             "re-run the train stage")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        cfg = build_config(ModelConfig, {k: v for k, v in model.items() if k in fields}, where=f"{file} model")
    except ConfigError as exc:
        raise ModelLoadError(f"{exc} — the checkpoint is damaged; re-run the train stage") from None
    arch = config.get("open_clip_config")
    if arch is not None and not isinstance(arch, dict):
        raise ModelLoadError(f"{file}: open_clip_config must be a mapping, got {type(arch).__name__}")
    return cfg, arch


def _read_json(file: Path) -> dict:
    """A JSON object from a small regular file, or `ModelLoadError` naming the file."""
    from .files import FileReadError, read_regular

    try:
        value = json.loads(read_regular(file, max_bytes=MAX_JSON_BYTES))
    except FileReadError as exc:
        raise ModelLoadError(f"{file}: {exc.detail}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ModelLoadError(f"{file} is not valid JSON ({exc}) — the checkpoint is damaged (truncated?); "
                             "re-run the train stage or restore the file") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{file} must hold a JSON object, got {type(value).__name__}")
    return value


def _ensure_architecture(name: str, arch: dict | None, source: Path) -> None:
    """Register an architecture stored in a checkpoint if open_clip does not know it here.

    A stored architecture is checked (`check_architecture`) before it is registered; one this
    process registered before is checked again when another checkpoint stores it differently.
    """
    import open_clip

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
    import open_clip

    if not _ARCH_NAME.fullmatch(name) or ".." in name:
        raise ModelLoadError(f"{source}: architecture name {name!r} is not a plain name (letters, digits, _ . + -)")
    for key, limit in ARCH_LIMITS.items():
        value = _declared(arch, key, source)
        if value > limit:
            raise ModelLoadError(f"{source}: architecture '{name}' declares {key} = {value}, above the limit of "
                                 f"{limit} — the config is damaged or not a CLIP this project can load")
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
        raise ModelLoadError(f"{source}: architecture '{name}' has {n:,} parameters, above the limit of "
                             f"{MAX_PARAMETERS:,} — the config is damaged or not a CLIP this project can load")


def _declared(arch: dict, key: str, source: Path) -> float:
    """The value of a dotted ``key`` in ``arch`` as one number (lists: summed; absent: 0)."""
    value: object = arch
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    items = value if isinstance(value, (list, tuple)) else [value]
    if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
               for v in items):
        raise ModelLoadError(f"{source}: {key} must be a number or a list of numbers, got {value!r}")
    return sum(v for v in items if v is not None)


def read_metadata(path: Path) -> dict:
    meta = Path(path) / METADATA
    return _read_json(meta) if meta.is_file() else {}


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
    from .files import FileReadError, open_regular

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
        if dtype not in SAFETENSORS_DTYPES or not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise _damaged(path, f"tensor {name!r} has dtype {dtype!r} and shape {shape!r}")
        if start != end or stop - start != math.prod(shape) * SAFETENSORS_DTYPES[dtype][1]:
            raise _damaged(path, f"tensor {name!r}: data offsets {[start, stop]} do not match its shape or neighbours")
        end = stop
    if end != data_bytes:
        raise _damaged(path, f"the tensors cover {end} of its {data_bytes} data bytes")


def _offsets(path: Path, name: str, entry) -> tuple[int, int]:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise _damaged(path, f"tensor {name!r} has data offsets {offsets!r}")
    return offsets[0], offsets[1]


def _damaged(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"{path} is not a valid safetensors file: {what} — the file is damaged or of another "
                          "format; re-run the train stage or restore it")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, after `read_safetensors_header` has checked it."""
    from safetensors.torch import load_file

    read_safetensors_header(path)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise _damaged(Path(path), f"{type(exc).__name__}: {exc}") from None


def export_official(model: QualiCLIP, out_file: Path) -> Path:
    """Write the official format: ``clip_model.``-prefixed CLIP state dict + ``prompts_features``."""
    state = {f"clip_model.{k}": v.detach().cpu() for k, v in model.clip.state_dict().items()}
    state["prompts_features"] = model.prompt_features.detach().cpu()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out_file)
    return out_file


def load_official_state(path: Path) -> dict[str, torch.Tensor]:
    """The raw tensors of an official file (weights_only), for inspection and tests."""
    return read_state_dict(Path(path))


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
