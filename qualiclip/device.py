"""Device names as params.yaml and the command line write them: the one place "auto" is resolved."""
from __future__ import annotations

import re
from typing import Annotated

import torch
from annotated_types import Predicate, doc

_DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def is_device_name(name: object) -> bool:
    """Whether ``name`` is a device params.yaml may name: auto, cpu, cuda, cuda:N or mps."""
    return isinstance(name, str) and _DEVICE_NAME.fullmatch(name) is not None


# A config field naming a device, checked when the config is built (a typo fails before any work)
DeviceName = Annotated[str, Predicate(is_device_name), doc("auto, cpu, cuda, cuda:N or mps")]


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; anything else as torch reads it (``cuda:1``)."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
