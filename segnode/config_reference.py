"""Every setting the node reads, with its type, default and meaning, from the settings models themselves
(segnode.config), so the reference cannot drift from what `serve` accepts."""

from __future__ import annotations

import enum
import json
import types
import typing
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from segnode.config import Settings


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    if annotation is SecretStr:
        return "secret"
    if annotation is Path:
        return "path"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(repr(m.value) for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def _yaml(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, Path):
        value = str(value)
    return json.dumps(value) if not isinstance(value, str) else value if value and value.strip() == value else repr(value)


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
        return "" if isinstance(value, BaseModel) else _yaml(value)
    if info.default is PydanticUndefined:
        return "(required)"
    return _yaml(info.default)


def _doc(model: type[BaseModel]) -> str:
    """A model's docstring as one line (its first sentence or two)."""
    return " ".join((model.__doc__ or "").split())


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds (itself, or the items of its list or dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def entries(model: type[BaseModel] = Settings, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(key, type, default, description) for every setting: a model's own values first, then its sections
    (type "section"); a list's or a dict's items are written `key[].x` and `key.<name>.x`."""
    nested = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        inner = _model_of(info.annotation)
        origin = typing.get_origin(info.annotation)
        description = " ".join((info.description or "").split())
        if inner is None:
            yield key, _type_name(info.annotation), _default(info), description
        elif origin is None:
            nested.append((key, "section", "", description or _doc(inner), inner, key + "."))
        else:
            many = typing.get_origin(next(a for a in (info.annotation, *typing.get_args(info.annotation))
                                          if typing.get_origin(a) in (list, dict)))
            item = f"{key}[]." if many is list else f"{key}.<name>."
            nested.append((key, _type_name(info.annotation), _default(info), description or _doc(inner), inner, item))
    for key, kind, default, description, inner, item_prefix in nested:
        yield key, kind, default, description
        yield from entries(inner, item_prefix)


def render() -> str:
    """The reference as text: a line per setting (key, type, default), its meaning indented below."""
    lines = ["# segnode settings: the keys of the YAML file `serve --config FILE` reads; type = default"]
    for key, kind, default, description in entries():
        if kind == "section":
            lines += ["", f"[{key}]"] + ([f"    {description}"] if description else [])
            continue
        if kind.startswith(("list[", "dict[")) and "." not in key:
            lines.append("")
        lines.append(f"{key}: {kind}" + (f" = {default}" if default else ""))
        if description:
            lines.append(f"    {description}")
    return "\n".join(lines) + "\n"
