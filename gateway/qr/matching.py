"""Attribute matching for C-FIND, PS3.4 C.2.2.2 (pure: no I/O, no logging of values).

A key's value in a C-FIND identifier is parsed into one of the PS3.4 matching types:

* C.2.2.2.1 Single Value Matching: exact; Person Name (PN) values match case-insensitively
  (the standard allows literal matching "insensitive to some or all aspects of case");
  every other VR matches case-sensitively.
* C.2.2.2.2 List of UID Matching: a UI key with several values (backslash-separated).
* C.2.2.2.3 Universal Matching: a zero-length value, or a value of only ``*``.
* C.2.2.2.4 Wild Card Matching: ``*`` (any run, including none) and ``?`` (exactly one
  character), not for DA, TM, DT, UI or the binary and numeric VRs.
* C.2.2.2.5 Range Matching: ``a-b``, ``a-`` and ``-b`` on DA, TM and DT; bounds inclusive;
  an upper bound given with less precision covers its whole unit (``-1200`` covers 12:00:59).

Leading and trailing spaces are not significant (PS3.5 6.2) and are removed; everything
else, ``%``, ``_``, ``'`` and ``\\`` included, is literal text to compare, never SQL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RANGE_VRS = frozenset({"DA", "TM", "DT"})
NO_WILDCARD_VRS = RANGE_VRS | frozenset(
    {"UI", "SL", "SS", "UL", "US", "FL", "FD", "OB", "OW", "OF", "OD", "OL", "UN", "AT", "SV", "UV"}
)
MAX_UIDS = 1000  # a longer UID list is refused rather than sent to the database


@dataclass(frozen=True)
class Universal:
    """C.2.2.2.3: every entity matches, empty values included."""


@dataclass(frozen=True)
class Single:
    """C.2.2.2.1: the stored value equals ``value``."""

    value: str


@dataclass(frozen=True)
class UIDList:
    """C.2.2.2.2: the stored UID is one of ``uids``."""

    uids: tuple[str, ...]


@dataclass(frozen=True)
class Wildcard:
    """C.2.2.2.4: ``*`` and ``?`` in ``pattern``; every other character is literal."""

    pattern: str


@dataclass(frozen=True)
class Range:
    """C.2.2.2.5: ``lower <= stored <= upper`` (an empty bound is open)."""

    lower: str
    upper: str


Matcher = Universal | Single | UIDList | Wildcard | Range


class MatchingError(ValueError):
    """A key value no PS3.4 matching type accepts (the reason names the rule, not the value)."""


def parse(vr: str, value: str) -> Matcher:
    """The matcher a key of ``vr`` with ``value`` (multiple values joined by ``\\``) asks for."""
    value = value.strip(" ")
    if value == "" or (vr not in NO_WILDCARD_VRS and value.strip("*") == "" and value):
        return Universal()
    if vr == "UI":
        uids = tuple(u.strip(" \x00") for u in value.split("\\") if u.strip(" \x00"))
        if len(uids) > MAX_UIDS:
            raise MatchingError(f"more than {MAX_UIDS} UIDs in a list")
        if not uids:
            return Universal()
        return Single(uids[0]) if len(uids) == 1 else UIDList(uids)
    if vr in RANGE_VRS and "-" in value:
        lower, upper = _split_range(vr, value)
        if not lower and not upper:
            raise MatchingError("a range needs at least one bound")
        return Range(lower, upper)
    if vr not in NO_WILDCARD_VRS and ("*" in value or "?" in value):
        return Wildcard(value)
    return Single(value)


def _split_range(vr: str, value: str) -> tuple[str, str]:
    if vr != "DT" or value.count("-") == 1:
        lower, _, upper = value.partition("-")
        return lower.strip(), upper.strip()
    # DT bounds may carry a UTC offset (-HHMM): the separator is the '-' that leaves a
    # well-formed date-time on both sides
    for m in re.finditer("-", value):
        lower, upper = value[: m.start()], value[m.end() :]
        if _dt_like(lower) and _dt_like(upper):
            return lower, upper
    raise MatchingError("a date-time range whose bounds cannot be told apart")


def _dt_like(text: str) -> bool:
    return text == "" or re.fullmatch(r"\d{4,14}(\.\d{1,6})?([+-]\d{4})?", text) is not None


def case_insensitive(vr: str) -> bool:
    return vr == "PN"


def matches(matcher: Matcher, stored: str, *, vr: str) -> bool:
    """Whether a stored value (multiple values joined by ``\\``) matches, in memory."""
    stored = stored.strip(" ")
    fold = case_insensitive(vr)
    if isinstance(matcher, Universal):
        return True
    if isinstance(matcher, Single):
        return _fold(stored, fold) == _fold(matcher.value, fold)
    if isinstance(matcher, UIDList):
        return stored in matcher.uids
    if isinstance(matcher, Wildcard):
        regex = wildcard_regex(_fold(matcher.pattern, fold))
        return regex.fullmatch(_fold(stored, fold)) is not None
    if not stored:
        return False
    if matcher.lower and stored < matcher.lower:
        return False
    return not (matcher.upper and stored[: len(matcher.upper)] > matcher.upper)


def multi_value_matches(matcher: Matcher, stored: str, *, vr: str) -> bool:
    """For keys like Modalities in Study: any one of the stored values matches; a
    several-valued single key matches when any of its values does."""
    values = [v for v in stored.split("\\") if v] or [""]
    if isinstance(matcher, Single) and "\\" in matcher.value:
        wanted = [Single(v) for v in matcher.value.split("\\") if v]
        return any(matches(w, v, vr=vr) for w in wanted for v in values)
    return any(matches(matcher, v, vr=vr) for v in values)


def _fold(text: str, fold: bool) -> str:
    return text.casefold() if fold else text


def wildcard_regex(pattern: str) -> re.Pattern[str]:
    """``*``/``?`` to a regular expression; everything else escaped."""
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern]
    return re.compile("".join(parts), re.DOTALL)


def like_pattern(pattern: str, escape: str = "\\") -> str:
    """A SQL LIKE pattern for a DICOM wildcard: ``%``, ``_`` and the escape are escaped,
    then ``*`` becomes ``%`` and ``?`` becomes ``_``."""
    out = []
    for c in pattern:
        if c in (escape, "%", "_"):
            out.append(escape + c)
        elif c == "*":
            out.append("%")
        elif c == "?":
            out.append("_")
        else:
            out.append(c)
    return "".join(out)


def like_literal(value: str, escape: str = "\\") -> str:
    """``value`` as a LIKE pattern that matches only itself."""
    return "".join(escape + c if c in (escape, "%", "_") else c for c in value)


def glob_pattern(pattern: str) -> str:
    """A SQLite GLOB pattern (case-sensitive) for a DICOM wildcard: ``[``, and ``*``/``?``
    that are literal nowhere in DICOM, are bracketed; ``*``/``?`` stay wildcards."""
    return "".join("[[]" if c == "[" else c for c in pattern)


__all__ = [
    "MAX_UIDS",
    "Matcher",
    "MatchingError",
    "Range",
    "Single",
    "UIDList",
    "Universal",
    "Wildcard",
    "glob_pattern",
    "like_literal",
    "like_pattern",
    "matches",
    "multi_value_matches",
    "parse",
    "wildcard_regex",
]
