"""A small TOML writer for generated documents (tests only; the product only reads TOML)."""

from __future__ import annotations

import datetime
import json
import math
from typing import Any


def scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are TOML basic-string escapes
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key(k)} = {scalar(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def key(name: Any) -> str:
    name = str(name)
    bare = name and all(c.isascii() and (c.isalnum() or c in "-_") for c in name)
    return name if bare else json.dumps(name)


def dumps(doc: dict[str, Any]) -> str:
    """Top-level scalars first, then tables and arrays of tables (one level of nesting)."""
    out: list[str] = []
    tables: list[tuple[str, Any]] = []
    for k, v in doc.items():
        if isinstance(v, dict) or (
            isinstance(v, list) and v and all(isinstance(x, dict) for x in v)
        ):
            tables.append((k, v))
        else:
            out.append(f"{key(k)} = {scalar(v)}")
    for k, v in tables:
        entries = v if isinstance(v, list) else [v]
        for entry in entries:
            out.append(f"[[{key(k)}]]" if isinstance(v, list) else f"[{key(k)}]")
            out += [f"{key(kk)} = {scalar(vv)}" for kk, vv in entry.items()]
    return "\n".join(out) + "\n"


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key/index path into a generated document (for mutating it at any depth)."""
    out: list[tuple[Any, ...]] = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out
