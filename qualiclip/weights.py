"""Weight files: reading a state dict from a file a user names, safely.

Two formats: safetensors, whose JSON header is checked (`read_safetensors_header`) before any
tensor is read or allocated, and torch files, loaded with ``weights_only=True`` so that no
pickled code runs. `check_state_dict` names the mismatch when the tensors do not fit a module.
The model (`qualiclip.model`) and the checkpoint (`qualiclip.checkpoint`) read through here;
`ModelLoadError` is raised by all three (and re-exported by `qualiclip.model`, where it always was).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .errors import QualiclipError
from .files import FileReadError, open_regular

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
