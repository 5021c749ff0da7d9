"""Declarative match rules for routes: data, never code.

A condition is a TOML table, one of::

    { attribute = "Modality", equals = "CT" }
    { attribute = "Modality", one_of = ["CT", "MR"] }
    { attribute = "StudyDescription", regex = "(?i)head" }
    { attribute = "Rows", range = [256, 1024] }        # inclusive; numbers
    { attribute = "StudyDate", range = ["20200101", "20251231"] }   # strings compare as text
    { attribute = "AccessionNumber", present = true }
    { attribute = "AccessionNumber", absent = true }
    { all = [ ... ] }   { any = [ ... ] }   { not = { ... } }

``attribute`` is a DICOM keyword of the instance's top-level data set, or one of the
association facts ``CalledAETitle``, ``CallingAETitle`` and ``CallingAddress``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import keyword_dict

ASSOCIATION_ATTRIBUTES = frozenset({"CalledAETitle", "CallingAETitle", "CallingAddress"})
STUDY_LEVEL_ATTRIBUTES = frozenset(
    {"StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate"}
)


class RuleError(ValueError):
    """A rule table is malformed; ``key`` is the path inside the rule."""

    def __init__(self, key: str, expected: str) -> None:
        self.key = key
        self.expected = expected
        super().__init__(f"{key}: {expected}")


@dataclass(frozen=True)
class MatchAll:
    """Matches every instance (a route without ``match``)."""


@dataclass(frozen=True)
class Equals:
    attribute: str
    value: str | int | float


@dataclass(frozen=True)
class OneOf:
    attribute: str
    values: tuple[str | int | float, ...]


@dataclass(frozen=True)
class Regex:
    attribute: str
    pattern: re.Pattern[str]


@dataclass(frozen=True)
class Range:
    attribute: str
    low: str | int | float
    high: str | int | float


@dataclass(frozen=True)
class Present:
    attribute: str
    present: bool


@dataclass(frozen=True)
class All:
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class Any_:
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class Not:
    condition: Condition


Condition = MatchAll | Equals | OneOf | Regex | Range | Present | All | Any_ | Not

_SCALAR = (str, int, float)
_OPERATORS = ("equals", "one_of", "regex", "range", "present", "absent")


def parse_condition(raw: Any, key: str) -> Condition:
    """Parse one condition table; raise :class:`RuleError` naming the key on any fault."""
    if not isinstance(raw, Mapping):
        raise RuleError(key, "a table such as { attribute = ..., equals = ... }")
    combinators = [name for name in ("all", "any", "not") if name in raw]
    if combinators:
        if len(raw) != 1:
            raise RuleError(key, f"'{combinators[0]}' must be the only key of its table")
        name = combinators[0]
        value = raw[name]
        if name == "not":
            return Not(parse_condition(value, f"{key}.not"))
        if not isinstance(value, list) or not value:
            raise RuleError(f"{key}.{name}", "a non-empty array of conditions")
        parts = tuple(parse_condition(item, f"{key}.{name}[{i}]") for i, item in enumerate(value))
        return All(parts) if name == "all" else Any_(parts)
    if "attribute" not in raw:
        raise RuleError(
            key, "'attribute' with one of " + ", ".join(_OPERATORS) + ", or all/any/not"
        )
    attribute = raw["attribute"]
    if not isinstance(attribute, str) or (
        attribute not in ASSOCIATION_ATTRIBUTES and attribute not in keyword_dict
    ):
        raise RuleError(f"{key}.attribute", "a DICOM keyword or CalledAETitle/CallingAETitle")
    unknown = set(raw) - {"attribute", *_OPERATORS}
    if unknown:
        raise RuleError(f"{key}.{sorted(unknown)[0]}", "no such key in a condition")
    operators = [op for op in _OPERATORS if op in raw]
    if len(operators) != 1:
        raise RuleError(key, "exactly one of " + ", ".join(_OPERATORS))
    op = operators[0]
    value = raw[op]
    where = f"{key}.{op}"
    if op == "equals":
        if not isinstance(value, _SCALAR) or isinstance(value, bool):
            raise RuleError(where, "a string or a number")
        return Equals(attribute, value)
    if op == "one_of":
        if not isinstance(value, list) or not value:
            raise RuleError(where, "a non-empty array of strings or numbers")
        for item in value:
            if not isinstance(item, _SCALAR) or isinstance(item, bool):
                raise RuleError(where, "a non-empty array of strings or numbers")
        return OneOf(attribute, tuple(value))
    if op == "regex":
        if not isinstance(value, str):
            raise RuleError(where, "a regular expression string")
        try:
            return Regex(attribute, re.compile(value))
        except re.error as exc:
            raise RuleError(where, f"a valid regular expression ({exc})") from exc
    if op == "range":
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, _SCALAR) and not isinstance(v, bool) for v in value)
            or isinstance(value[0], str) != isinstance(value[1], str)
        ):
            raise RuleError(where, "[low, high]: two numbers or two strings")
        return Range(attribute, value[0], value[1])
    if not isinstance(value, bool):
        raise RuleError(where, "true or false")
    return Present(attribute, value if op == "present" else not value)


def attributes_of(condition: Condition) -> frozenset[str]:
    """Every attribute a condition reads."""
    if isinstance(condition, MatchAll):
        return frozenset()
    if isinstance(condition, All | Any_):
        out: frozenset[str] = frozenset()
        for part in condition.conditions:
            out |= attributes_of(part)
        return out
    if isinstance(condition, Not):
        return attributes_of(condition.condition)
    return frozenset({condition.attribute})
