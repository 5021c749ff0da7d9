"""Evaluating route conditions against an instance's header and its association (pure).

A multi-valued attribute (ImageType, say) matches ``equals``, ``one_of`` and ``regex``
when any of its values does. ``range`` compares numbers numerically and strings as text
(so ``["20250101", "20251231"]`` is a date range). A missing or empty attribute matches
only ``absent``.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.config.rules import (
    All,
    Any_,
    Condition,
    Equals,
    MatchAll,
    Not,
    OneOf,
    Present,
    Range,
    Regex,
)

Lookup = Callable[[str], list[str]]
"""Returns an attribute's values as strings; an empty list when absent or empty."""


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _equal(value: str, expected: str | int | float) -> bool:
    if isinstance(expected, str):
        return value.strip() == expected
    number = _as_number(value)
    return number is not None and number == float(expected)


def _in_range(value: str, low: str | int | float, high: str | int | float) -> bool:
    if isinstance(low, str) and isinstance(high, str):
        return low <= value.strip() <= high
    number = _as_number(value)
    return number is not None and float(low) <= number <= float(high)


def matches(condition: Condition, lookup: Lookup) -> bool:
    if isinstance(condition, MatchAll):
        return True
    if isinstance(condition, All):
        return all(matches(c, lookup) for c in condition.conditions)
    if isinstance(condition, Any_):
        return any(matches(c, lookup) for c in condition.conditions)
    if isinstance(condition, Not):
        return not matches(condition.condition, lookup)
    values = lookup(condition.attribute)
    if isinstance(condition, Present):
        return bool(values) == condition.present
    if isinstance(condition, Equals):
        return any(_equal(v, condition.value) for v in values)
    if isinstance(condition, OneOf):
        return any(_equal(v, e) for v in values for e in condition.values)
    if isinstance(condition, Regex):
        return any(condition.pattern.search(v) for v in values)
    if isinstance(condition, Range):
        return any(_in_range(v, condition.low, condition.high) for v in values)
    raise TypeError(f"unknown condition {condition!r}")
