"""Typed settings: trees of dataclasses read from TOML with KEY=VALUE overrides, checked.

`from_dict(cls, doc, source)` builds any tree of dataclasses: every TOML table maps to a field
whose type is itself a dataclass, every value is checked against the field's annotation (int,
float, bool, str, X | None, tuple[X, ...], list[X], dict[str, Any], Any). An unknown key or a
value of the wrong type raises one `ConfigError` naming the key and `source`; a dataclass that
validates itself in `__post_init__` has its `ConfigError` prefixed with `source` too.

`parse_override("a.b=value")` is the one KEY=VALUE parser of every command (`--set`, `-o`,
`--adapt`, `--backbone-arg`): the value is a TOML literal ("1e-3", "true", "[1, 5]", "'x'"),
or the plain string when it does not parse as TOML. numpy-free and torch-free.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mtl_edge.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless `ok` (the validation helpers of self-checking tables)."""
    if not ok:
        raise ConfigError(message)


def require_one_of(table: str, key: str, value: str, allowed: Sequence[str]) -> None:
    """`table.key` must be one of `allowed`."""
    require(value in allowed, f"{table}.{key}={value!r}: use one of {', '.join(allowed)}")


def require_at_least(table: str, obj: Any, keys: Sequence[str], low: float) -> None:
    """Every `table.key` of `obj` must be >= `low`."""
    for key in keys:
        value = getattr(obj, key)
        require(value >= low, f"{table}.{key}={value}: must be >= {low:g}")


def require_positive(table: str, obj: Any, keys: Sequence[str]) -> None:
    """Every `table.key` of `obj` must be > 0."""
    for key in keys:
        value = getattr(obj, key)
        require(value > 0, f"{table}.{key}={value}: must be > 0")


def read_toml(path: Path) -> dict[str, Any]:
    """The parsed TOML file. Raises ConfigError on bad TOML or an unreadable file."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None


def parse_value(text: str) -> Any:
    """A TOML literal ("1e-3", "true", "[1, 5]", "'x'"), or the plain string."""
    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def parse_override(
    item: str, option: str = "--set", example: str = "pretrain.epochs=2"
) -> tuple[list[str], Any]:
    """ "a.b=value" -> (["a", "b"], value) (see `parse_value`).

    Raises:
        ConfigError: not KEY=VALUE, naming `option` and an `example`.
    """
    key, sep, text = item.partition("=")
    keys = [k.strip() for k in key.strip().split(".")]
    if not sep or not all(keys):
        raise ConfigError(f"{option} {item!r}: write KEY=VALUE, e.g. {option} {example}")
    return keys, parse_value(text)


def parse_options(
    items: Sequence[str], option: str = "-o", example: str = "per_class=60"
) -> dict[str, Any]:
    """Flat KEY=VALUE items -> {key: value}, e.g. reader options or backbone arguments."""
    return apply_overrides({}, items, option, example)


def apply_overrides(
    doc: Mapping[str, Any],
    overrides: Sequence[str],
    option: str = "--set",
    example: str = "pretrain.epochs=2",
) -> dict[str, Any]:
    """`doc` with every "a.b=value" set (tables created as needed); `doc` is not changed."""
    out = _deep_copy(doc)
    for item in overrides:
        keys, value = parse_override(item, option, example)
        table = out
        for k in keys[:-1]:
            nxt = table.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{option} {item!r}: {k!r} is a value, not a table")
            table = nxt
        table[keys[-1]] = value
    return out


def _deep_copy(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in doc.items()}


def from_dict(cls: type[T], doc: Mapping[str, Any], source: str = "config") -> T:
    """An instance of dataclass `cls` from nested plain data (TOML tables), checked.

    Raises:
        ConfigError: unknown key or wrong type, naming the dotted key and `source`.
    """
    if isinstance(doc, cls):
        return doc
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{source}: expected a table for {cls.__name__}")
    return _build(cls, doc, "", source)


def _build(cls: type[T], doc: Mapping[str, Any], prefix: str, source: str) -> T:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(doc) - set(known))
    if unknown:
        where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]} in {where}; known: {', '.join(known)}"
        )
    values = {name: _convert(hints[name], doc[name], prefix + name, source) for name in doc}
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    """`value` checked against annotation `tp` (ints widen to float, lists to tuples)."""

    def wrong() -> ConfigError:
        return ConfigError(
            f"{source}: {key} = {value!r} has the wrong type; expected {_type_name(tp)}"
        )

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise wrong()
        return _build(tp, value, key + ".", source)  # type: ignore[arg-type]
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key, source)
            except ConfigError:
                continue
        raise wrong()
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise wrong()
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_convert(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        elif origin is tuple:
            if len(args) != len(value):
                raise wrong()
            items = [
                _convert(a, v, f"{key}[{i}]", source)
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            ]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise wrong()
        return _deep_copy(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong()
        return value
    raise ConfigError(f"{source}: {key}: unsupported config type {_type_name(tp)}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain nested data (tuples become lists), TOML/JSON-able
    (None values are left out, TOML has no null)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {
                f.name: plain(getattr(v, f.name))
                for f in dataclasses.fields(v)
                if getattr(v, f.name) is not None
            }
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items() if x is not None}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(config)


def to_toml(doc: Mapping[str, Any]) -> str:
    """Plain nested data as TOML text (tables for mappings; values as TOML literals)."""
    lines: list[str] = []

    def literal(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(literal(x) for x in v) + "]"
        if isinstance(v, Mapping):
            return "{ " + ", ".join(f"{_key(k)} = {literal(x)}" for k, x in v.items()) + " }"
        raise ConfigError(f"cannot write {v!r} as TOML")

    # top-level mappings are [tables]; mappings inside them are inline tables
    for k, v in doc.items():
        if not isinstance(v, Mapping):
            lines.append(f"{_key(k)} = {literal(v)}")
    for k, v in doc.items():
        if isinstance(v, Mapping):
            lines += ["", f"[{_key(k)}]"] + [f"{_key(a)} = {literal(x)}" for a, x in v.items()]
    return "\n".join(lines).strip() + "\n"


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else f'"{k}"'
