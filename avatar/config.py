"""Configs are dataclasses, serialisable to JSON/YAML and stored with every artifact they produce.

``to_dict`` / ``from_dict`` round-trip nested dataclasses; unknown keys are an error (a typo in a
preset must not be silently ignored).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

from avatar.errors import InvalidInput

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
    """Dataclass (possibly nested) -> plain dict of JSON types."""
    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"{cfg!r} is not a dataclass")
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[T], data: dict) -> T:
    """Plain dict -> dataclass ``cls``; nested dataclass fields are converted recursively.

    Raises:
        InvalidInput: on keys that ``cls`` does not have.
    """
    if not isinstance(data, dict):
        raise InvalidInput(f"config for {cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise InvalidInput(f"unknown {cls.__name__} option(s): {sorted(unknown)}; valid: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints.get(key)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value)
        elif isinstance(value, list) and typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def save_json(obj: Any, path: str | Path) -> None:
    """Write a dataclass or dict as pretty JSON."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_json(path: str | Path) -> dict:
    """Read a JSON file written by :func:`save_json`."""
    return json.loads(Path(path).read_text())
