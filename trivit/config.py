"""Typed, validated configs: nested dataclasses filled from YAML and ``key.sub=value`` overrides.

Every config section is a ``@dataclass(kw_only=True)``. :func:`from_dict` checks each key
and value against the dataclass fields before anything is built, so a typo or a wrong type
fails at start-up with a message that names the key and the fix, not hours into a run.
Range checks live in each dataclass's ``__post_init__`` and raise :class:`ConfigError`
through :func:`check`; :func:`from_dict` prefixes the dotted path of the section.
"""
from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML loader that also reads ``1e-3`` as a float (PyYAML's YAML 1.1 reads it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$"),
    list("-+0123456789"),
)


def read_yaml(text: str) -> Any:
    """Parse YAML text with trivit's loader."""
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key and what is allowed."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.detail = message
        super().__init__(f"config key '{key}': {message}" if key else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key placed under ``prefix``."""
        key = f"{prefix}.{self.key}" if prefix and self.key else (prefix or self.key)
        return ConfigError(key, self.detail)


def check(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a :class:`ConfigError` for ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(key, f"got {value!r}; allowed: {allowed}")


def finite(*values: float) -> bool:
    """True when every value is a finite number (YAML reads .nan and .inf)."""
    return all(math.isfinite(value) for value in values)


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted keys that a config class accepts, nested sections expanded."""
    keys = []
    for field in dataclasses.fields(cls):
        name = f"{prefix}{field.name}"
        nested = _dataclass_type(_field_types(cls)[field.name])
        keys.extend(leaf_keys(nested, f"{name}.") if nested else [name])
    return keys


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, _root: type | None = None, _prefix: str = "") -> T:
    """Build config ``cls`` from a plain (nested) mapping, validating every key and value."""
    root = _root or cls
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(_prefix.rstrip("."), f"expected a mapping of keys, got {data!r}")
    types_ = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            raise ConfigError(f"{_prefix}{key}", "unknown key" + _suggestion(f"{_prefix}{key}", root))
    values = {}
    for name, raw in data.items():
        key = f"{_prefix}{name}"
        values[name] = _coerce(types_[name], raw, key, root)
    try:
        return cls(**values)
    except ConfigError as error:
        raise error.under(_prefix.rstrip(".")) from None


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested data (what is written to ``config.yaml``)."""
    return dataclasses.asdict(config)


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into ``{"a": {"b": 1}, "c": "x"}``; values are read as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError("", f"override {item!r} is not of the form key.sub=value")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"'{part}' was given both a value and sub-keys")
        try:
            node[leaf] = read_yaml(raw) if raw else ""
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or error
            raise ConfigError(key, f"value {raw!r} is not valid YAML ({problem}); quote the whole override, "
                                   "e.g. 'model.timm_kwargs={embed_dim: 32, depth: 2}'") from None
    return nested


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively overlay ``update`` on ``base`` (a new dict; nested mappings merged)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Load config ``cls`` from a YAML file overlaid with ``key.sub=value`` overrides.

    A file may name others with ``base: other.yaml`` or ``base: [a.yaml, b.yaml]`` (relative to
    itself): they are loaded first, in order, and this file's keys override them, so recipes
    state only what differs.
    """
    data = read_config_file(path) if path is not None else {}
    return from_dict(cls, merge(data, parse_overrides(overrides)))


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of a YAML config file with its ``base`` chain resolved."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError("", f"config file {str(path)!r} is a folder; pass --config PATH to a YAML file in it")
    if not path.is_file():
        raise ConfigError("", f"config file {str(path)!r} does not exist (pass --config PATH to a YAML file)")
    if path.resolve() in _chain:
        raise ConfigError("base", f"{str(path)!r} is its own base (through {' -> '.join(map(str, _chain))})")
    try:
        data = read_yaml(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or error
        raise ConfigError("", f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError("", f"config file {str(path)!r} must hold a mapping of keys at the top level")
    data = dict(data or {})
    bases = data.pop("base", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError("base", f"in {str(path)!r}: got {bases!r}; allowed: a config file name or a list of "
                                  "them, relative to this file (e.g. base: [deit_imagenet.yaml])")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = merge(merged, read_config_file(path.parent / base, _chain + (path.resolve(),)))
    return merge(merged, data)


def _suggestion(key: str, root: type) -> str:
    candidates = leaf_keys(root)
    sections = {k.rsplit(".", 1)[0] for k in candidates if "." in k}
    close = difflib.get_close_matches(key, candidates + sorted(sections), n=1, cutoff=0.5)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in candidates if k.rsplit(".", 1)[-1] == leaf][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_type(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str, root: type) -> Any:
    """Check ``value`` against type ``tp``; the only conversions are int -> float and list -> tuple."""
    nested = _dataclass_type(tp)
    if nested:
        if isinstance(value, nested):
            return value
        return from_dict(nested, value, _root=root, _prefix=f"{key}.")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _coerce(option, value, key, root)
            except ConfigError:
                continue
        raise ConfigError(key, f"got {value!r}; expected {_describe(tp)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(key, f"got {value!r}; allowed: {_describe(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"got {value!r}; expected {_describe(tp)}")
        item_type = args[0] if args else Any
        items = [_coerce(item_type, v, f"{key}[{i}]", root) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"got {value!r}; expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(key, f"got {value!r}; expected null")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(key, f"got {value!r}; expected int")
    if isinstance(value, tp):
        return value
    if tp is str and isinstance(value, (datetime.date, datetime.time)):
        raise ConfigError(key, f"YAML reads {value} as a {type(value).__name__}; quote it to keep it a string, "
                               f"e.g. {key}='\"{value}\"' on the command line or {key.rsplit('.', 1)[-1]}: "
                               f"\"{value}\" in a file")
    raise ConfigError(key, f"got {value!r} ({type(value).__name__}); expected {_describe(tp)}")
