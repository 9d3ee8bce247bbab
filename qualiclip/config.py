"""Typed, frozen configs built from a params file: the one validation layer of every stage.

Every stage owns a frozen dataclass whose fields declare their allowed values beside them, as
PEP 593 metadata with the `annotated_types` vocabulary (``steps: Annotated[int, Ge(1)] = 300``,
``ema: Annotated[float, Interval(ge=0, lt=1)]``, ``Predicate`` for names and formats). Each
config's ``__post_init__`` calls `check_fields`, so a config is checked however it is built: by
`build_config` from a params section, or in Python (benchmarks, tests, library users).

A params file is read by `load_params` (strict YAML: a key written twice, aliases of whole
mappings or lists, and syntax errors are refused with their line and column) and checked whole by
`build_sections`: unknown sections are named with the closest valid one, a section the caller
reads must be present (``train: {}`` asks for every default explicitly), and every section
present is built, so a broken ``evaluate:`` fails before ``train`` starts. Every such error is a
`ConfigError`: one line naming the file, the key and the fix.

A config may embed another: a field typed as a config dataclass (``TrainConfig.loss:
LossWeights``, ``DegradeConfig.sample: SampleConfig``) takes its fields from the same section,
flat, so params.yaml stays one level deep and the embedded config is used as it is, never
copied field by field. `config_fields` gives the flat view back (what params.yaml holds); field
metadata is never part of it, so params hashes and the train resume key do not see it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import reprlib
import types
import typing
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import annotated_types as at
import yaml

from .errors import QualiclipError

T = TypeVar("T")

# A random seed as numpy and torch both take it.
Seed = Annotated[int, at.Interval(ge=0, le=2**32 - 1)]


class ConfigError(QualiclipError, ValueError):
    """A params file or section that does not match its configs: one line naming the key and the fix."""


# ---------------------------------------------------------------------------------------------
# Reading a params file


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what a params file never needs but YAML accepts silently:
    a key written twice in one mapping (YAML keeps the last), and an alias (``*name``) of a whole
    mapping or list (aliases nest exponentially, a "billion laughs", or loop). Aliases of single
    values stay allowed."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if not isinstance(self.anchors.get(event.anchor), (yaml.ScalarNode, type(None))):
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"the alias *{event.anchor} repeats a whole mapping or list — write it out "
                    "(a params file allows aliases of single values only)",
                    event.start_mark,
                )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys merged in (<<) may be overridden: that is what a merge is for
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and first.setdefault(key, key_node) is not key_node:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {_short(key)} is written twice in one mapping (first at line "
                    f"{first[key].start_mark.line + 1}) — keep one",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The sections of the params file ``path`` as a mapping, read strictly (see `_StrictLoader`).

    `ConfigError` when the file is missing, is not YAML (with the line and column), is empty or
    does not hold a mapping of sections.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found — run from the project root or pass --params")
    try:
        data = yaml.load(path.read_bytes(), Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = _one_line(", ".join(t for t in (exc.context, exc.problem) if t))
        fix = "" if " — " in problem else " — fix the YAML"  # the loader's own refusals name their fix
        raise ConfigError(f"{path}{where}: {problem}{fix}") from None
    except yaml.reader.ReaderError as exc:
        raise ConfigError(f"{path}: not YAML text at byte {exc.position} ({exc.reason}) — save it as UTF-8") from None
    except (yaml.YAMLError, ValueError, OverflowError) as exc:  # e.g. a date YAML reads but datetime refuses
        raise ConfigError(f"{path}: a value YAML cannot read: {_one_line(str(exc))} — fix it") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply for a params file — fix the YAML") from None
    if not data:
        raise ConfigError(
            f"{path} is empty — a params file holds one section per stage ('train:' ...): "
            "start from the project's params.yaml"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections ('train:' ...), got {_kind(data)} {_short(data)}")
    return data


def build_sections(
    params: Mapping[str, Any], sections: Mapping[str, type], *, file: str | Path, needs: Iterable[str] = ()
) -> dict[str, Any]:
    """Every section of ``params`` built into its config of ``sections`` (name -> config class).

    `ConfigError` naming ``file`` for a section not in ``sections`` (with the closest name), a
    section of ``needs`` that is absent, and the first bad key or value of any section present.
    An absent section the caller does not need is left out of the result.
    """
    for name in params:
        if name not in sections:
            raise ConfigError(
                f"{file}: unknown section {_short(name)}{_did_you_mean(name, sections)} "
                f"(sections: {', '.join(sections)})"
            )
    configs: dict[str, Any] = {}
    for name, section in params.items():
        try:
            configs[name] = build_config(sections[name], section, where=name)
        except ConfigError as exc:
            raise ConfigError(f"{file}: {exc}") from None
    for name in needs:
        if name not in params:
            raise ConfigError(f"{file} has no '{name}:' section — add it ('{name}: {{}}' takes every default)")
    return configs


# ---------------------------------------------------------------------------------------------
# Building and checking one config


def build_config(cls: type[T], section: Mapping[str, Any] | None, *, where: str) -> T:
    """Build the frozen dataclass ``cls`` from ``section`` (embedded configs from the same keys).

    Unknown keys raise `ConfigError` naming the key and the closest valid one; values are
    coerced to the annotated type where that is unambiguous (list -> tuple, int -> float) and
    then checked against the field's declared values (`check_fields`). ``None`` (a section
    header with nothing under it) is the empty section: every default.
    """
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ConfigError(
            f"params section '{where}' must be a mapping of keys ('key: value' lines), "
            f"got {_kind(section)} {_short(section)}"
        )
    keys = section_keys(cls)
    unknown = [k for k in section if k not in keys]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"unknown key {_short(key)} in params section '{where}'{_did_you_mean(key, keys)} "
            f"(valid keys: {', '.join(sorted(keys))})"
        )
    try:
        return _build(cls, dict(section), where)
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
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # T: a config dataclass
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
        raise last or ConfigError(f"{where}: bad value {_short(value)}")
    if origin is typing.Literal:  # the choices are checked with the other declared values
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (
        hint in (int, float, str, bool, dict)
        and not isinstance(value, hint)
        or (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where} must be {_TYPE_NAMES[hint]}, got {_short(value)}")
    return value


_TYPE_NAMES = {int: "int", float: "float", str: "str", bool: "bool", dict: "a mapping"}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def check_fields(cfg: Any, section: str) -> None:
    """Raise `ConfigError` naming ``section.key`` for the first field of ``cfg`` outside its
    declared values: its ``Literal`` choices, `annotated_types` bounds (``Ge``, ``Gt``, ``Le``,
    ``Lt``, ``Interval``), lengths (``MinLen``, ``MaxLen``, ``Len``) and ``Predicate``s, in tuples
    item by item; a float must be finite. A predicate either returns whether the value is good
    (its ``doc()`` says what is expected) or raises a `QualiclipError` naming the fix (a
    registry's did-you-mean), which is raised again with the key in front. Embedded configs
    check themselves when they are built. Called by each config's ``__post_init__``."""
    for f in dataclasses.fields(cfg):
        hint = _hints(type(cfg))[f.name]  # type: ignore[arg-type]  # a class is hashable
        if not _embedded(hint):
            _check(getattr(cfg, f.name), hint, f"{section}.{f.name}")


def _check(value: Any, hint: Any, key: str) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        _check(value, args[0], key)
        _check_metadata(value, args[0], args[1:], key)
    elif origin in (typing.Union, types.UnionType):
        if value is not None or type(None) not in args:
            for arm in (a for a in args if a is not type(None)):
                _check(value, arm, key)
    elif origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}, got {_short(value)}")
    elif origin is tuple and args:
        for i, item in enumerate(value):
            _check(item, args[0], f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")


def _check_metadata(value: Any, base: Any, metadata: tuple, key: str) -> None:
    flat = [m for group in metadata for m in (group if isinstance(group, at.GroupedMetadata) else [group])]
    docs = [m.documentation for m in flat if isinstance(m, at.DocInfo)]
    bounds = [m for m in flat if isinstance(m, (at.Gt, at.Ge, at.Lt, at.Le))]
    if not all(_BOUND_HOLDS[type(b)](value, b) for b in bounds):
        kind = "an integer" if base is int else "a number"
        hint = f" ({docs[0]})" if docs else ""
        raise ConfigError(f"{key} must be {kind} {_describe_bounds(bounds)}, got {_short(value)}{hint}")
    if any(isinstance(m, (at.MinLen, at.MaxLen)) for m in flat):
        lo = max((m.min_length for m in flat if isinstance(m, at.MinLen)), default=0)
        hi = min((m.max_length for m in flat if isinstance(m, at.MaxLen)), default=math.inf)
        if not lo <= len(value) <= hi:
            unit = "characters" if isinstance(value, str) else "items"
            count = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi == math.inf else f"{lo} to {hi}"
            raise ConfigError(f"{key} must have {count} {unit}, got {_short(value)}")
    for p in (m for m in flat if isinstance(m, at.Predicate)):
        try:
            good = p.func(value)
        except QualiclipError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        if not good:
            raise ConfigError(f"{key} must be {docs[0] if docs else p.func.__name__}, got {_short(value)}")


# NaN fails every bound: each test is written so that it must hold
_BOUND_HOLDS = {
    at.Gt: lambda v, b: v > b.gt,
    at.Ge: lambda v, b: v >= b.ge,
    at.Lt: lambda v, b: v < b.lt,
    at.Le: lambda v, b: v <= b.le,
}


def _describe_bounds(bounds: list) -> str:
    """``>= 1``, ``> 0``, ``in [0, 1)``: the bounds of a field as a reader writes them."""
    lo = next((b for b in bounds if isinstance(b, (at.Gt, at.Ge))), None)
    hi = next((b for b in bounds if isinstance(b, (at.Lt, at.Le))), None)
    if lo is not None and hi is not None:
        left = f"({lo.gt}" if isinstance(lo, at.Gt) else f"[{lo.ge}"
        right = f"{hi.lt})" if isinstance(hi, at.Lt) else f"{hi.le}]"
        return f"in {left}, {right}"
    if lo is not None:
        return f"> {lo.gt}" if isinstance(lo, at.Gt) else f">= {lo.ge}"
    assert hi is not None, bounds  # called with at least one bound
    return f"< {hi.lt}" if isinstance(hi, at.Lt) else f"<= {hi.le}"


# ---------------------------------------------------------------------------------------------
# Messages: one line, values shortened


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def _short(value: Any) -> str:
    """``repr(value)`` cut to a readable length; never more than one line."""
    return _REPR.repr(value)


def _kind(value: Any) -> str:
    names: dict[type, str] = {list: "a list", dict: "a mapping", str: "a string"}
    return names.get(type(value), f"a {type(value).__name__}")


def _one_line(text: str | None) -> str:
    return " ".join(str(text).split())


def _did_you_mean(name: Any, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f"{lookalike_note(name, close[0])} — did you mean '{close[0]}'?" if close else ""


def lookalike_note(name: Any, close: str) -> str:
    """Which characters of ``name`` are not what they seem, when it looks like ``close`` but is not
    it: a Cyrillic 'а' in 'trаin', a zero-width space, a non-breaking space. Empty otherwise, or
    when ``name`` is plain ASCII (its repr then shows the difference)."""
    if not isinstance(name, str) or name.isascii() or name == close:
        return ""
    odd = [f"{c!r} at position {i + 1} is {_char_name(c)}" for i, c in enumerate(name) if not c.isascii()]
    return f" ({'; '.join(odd[:3])}{'; ...' if len(odd) > 3 else ''}, not ASCII)"


def _char_name(char: str) -> str:
    return f"U+{ord(char):04X} {unicodedata.name(char, 'an unnamed character')}"


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
