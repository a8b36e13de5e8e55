"""Typed configuration: dataclasses, named profiles and YAML overrides, no global config tree.

A run's configuration is one dataclass. ``resolve`` starts from its defaults, applies a named profile (e.g.
``quick``), then a YAML file of overrides, then ``key=value`` pairs from the command line; every key and value is
checked against the dataclass fields, and the resolved result is written beside the checkpoint.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["ConfigError", "apply_overrides", "parse_assignments", "resolve", "save_config", "to_dict"]

T = TypeVar("T")


class ConfigError(ValueError):
    """An unknown key or a value of the wrong type in a configuration."""


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain YAML/JSON-friendly data (tuples become lists)."""
    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            raise ConfigError(f"config key {name!r} expects a list of {len(args)} values, got {value!r}")
        kinds = [args[0]] * len(value) if args and args[-1] is Ellipsis else list(args)
        return tuple(_coerce(name, v, a) for v, a in zip(value, kinds, strict=True))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {name!r} expects true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {name!r} expects an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key {name!r} expects a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {name!r} expects a string, got {value!r}")
    raise ConfigError(f"config key {name!r}: unsupported annotation {annotation!r}")


def apply_overrides(cfg: T, overrides: Mapping[str, Any], source: str = "overrides") -> T:
    """Return a copy of ``cfg`` with ``overrides`` applied, every key and type checked.

    Args:
        cfg: A dataclass instance.
        overrides: Field name to new value.
        source: Where the overrides come from, for error messages (e.g. a file name).

    Returns:
        The new config.

    Raises:
        ConfigError: On an unknown key or a value of the wrong type (the message names both and the source).
    """
    hints = typing.get_type_hints(type(cfg))
    fields = {f.name for f in dataclasses.fields(cfg)}  # type: ignore[arg-type]
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown config key {key!r}; valid keys: {', '.join(sorted(fields))}")
        try:
            changes[key] = _coerce(key, value, hints[key])
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings from a command line; values are read as YAML (``lr=1e-3``, ``size=[128,64]``).

    Raises:
        ConfigError: For an item without ``=``.
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {item!r}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):
            # YAML 1.1 reads "1e-3" as a string; people mean the number.
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key.strip()] = parsed
    return out


def resolve(
    default: T,
    profiles: Mapping[str, Mapping[str, Any]] | None = None,
    profile: str | None = None,
    yaml_file: str | Path | None = None,
    assignments: list[str] | None = None,
) -> T:
    """Defaults, then a named profile, then a YAML file, then ``key=value`` assignments.

    Raises:
        ConfigError: On an unknown profile, an unreadable YAML file, or a bad key/value anywhere.
    """
    cfg = default
    if profile is not None:
        if not profiles or profile not in profiles:
            known = ", ".join(sorted(profiles or {}))
            raise ConfigError(f"unknown profile {profile!r}; known: {known}")
        cfg = apply_overrides(cfg, profiles[profile], source=f"profile {profile!r}")
    if yaml_file is not None:
        path = Path(yaml_file)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        cfg = apply_overrides(cfg, data, source=str(path))
    if assignments:
        cfg = apply_overrides(cfg, parse_assignments(assignments), source="command line")
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
