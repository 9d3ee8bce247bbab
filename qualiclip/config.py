"""Typed, frozen stage configs built from `params.yaml` sections.

Every stage owns a frozen dataclass; `build_config` turns the stage's section of
`params.yaml` into it, rejecting unknown keys by name so a typo never passes silently.

A config may embed another: a field typed as a config dataclass (``TrainConfig.loss:
LossWeights``, ``DegradeConfig.sample: SampleConfig``) takes its fields from the same section,
flat, so params.yaml stays one level deep and the embedded config is used as it is, never
copied field by field. `config_fields` gives the flat view back (what params.yaml holds).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from .errors import QualiclipError

T = TypeVar("T")


class ConfigError(QualiclipError, ValueError):
    """A params section that does not match its stage config."""


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read a params file; a missing file is a clear error, an empty one is ``{}``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found — run from the project root or pass --params")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def build_config(cls: type[T], section: Mapping[str, Any] | None, *, where: str) -> T:
    """Build the frozen dataclass ``cls`` from ``section`` (embedded configs from the same keys).

    Unknown keys raise `ConfigError` naming the key and the closest valid one; values are
    coerced to the annotated type where that is unambiguous (list -> tuple, int -> float).
    """
    section = dict(section or {})
    keys = section_keys(cls)
    unknown = [k for k in section if k not in keys]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f" — did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"unknown key '{key}' in params section '{where}'{hint} (valid keys: {', '.join(sorted(keys))})"
        )
    try:
        return _build(cls, section, where)
    except TypeError as exc:  # a required key is missing
        raise ConfigError(f"params section '{where}': {exc}") from None


def section_keys(cls: type) -> list[str]:
    """The params keys of config ``cls``: its fields, an embedded config's keys in its place."""
    hints = typing.get_type_hints(cls)
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        keys += section_keys(hints[f.name]) if _embedded(hints[f.name]) else [f.name]
    assert len(keys) == len(set(keys)), f"{cls.__name__} embeds a config whose keys clash with its own"
    return keys


def _build(cls: type[T], section: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if _embedded(hint):
            inner = {k: section[k] for k in section_keys(hint) if k in section}
            if inner:  # otherwise the field's default config
                kwargs[f.name] = _build(hint, inner, where)
        elif f.name in section:
            kwargs[f.name] = _coerce(section[f.name], hint, f"{where}.{f.name}")
    return cls(**kwargs)


def _embedded(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        last: Exception | None = None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                last = exc
        raise last or ConfigError(f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")
    return value


def config_fields(cfg: Any) -> dict[str, Any]:
    """A config's values by params key, embedded configs flattened in place: params.yaml's view."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            values.update(config_fields(value))
        else:
            values[f.name] = value
    return values


def config_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config by params key (tuples become lists)."""
    return json.loads(json.dumps(config_fields(cfg), default=str))


def params_hash(*cfgs: Any) -> str:
    """A short stable hash of one or more configs, for naming runs and model versions."""
    blob = json.dumps([config_dict(c) for c in cfgs], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
