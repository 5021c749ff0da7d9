"""Replacement values: dummies valid for their VR (PS3.5 6.2), date shifts, cleaned text.

* D (dummy): a fixed value of the right VR that is also a legal value (dates 19000101, times 000000,
  numbers 0, text ``ANONYMIZED``, binary two zero bytes); sequences are kept and cleaned instead.
* C on dates (Retain Longitudinal Temporal Information with Modified Dates, PS3.15 E.3.6): DA and
  the
  date part of DT shift by the patient's day offset; times of day and DT time parts are kept. A
  value
  that does not parse as a date is emptied (fail safe).
* C on text (Clean Descriptors / Structured Content / Graphics, E.3.4, E.3.5, E.3.3): the words of
  the
  instance's own identifying values (see :mod:`gateway.deid.leak`), date-like strings and runs of
  four
  or more digits are replaced by ``*``; everything else is kept. The leak gate checks the result.
"""

from __future__ import annotations

import re
from datetime import date, timedelta
from typing import Any

DUMMY_TEXT = "ANONYMIZED"
DUMMY: dict[str, Any] = {
    "AE": "ANONYMIZED",
    "AS": "000D",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "DS": "0",
    "IS": "0",
    "LO": DUMMY_TEXT,
    "LT": DUMMY_TEXT,
    "SH": DUMMY_TEXT,
    "ST": DUMMY_TEXT,
    "UC": DUMMY_TEXT,
    "UT": DUMMY_TEXT,
    "PN": DUMMY_TEXT,
    "UR": "",
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "SV": 0,
    "UL": 0,
    "US": 0,
    "UV": 0,
    "AT": 0,
    "OB": b"\x00\x00",
    "OD": b"\x00" * 8,
    "OF": b"\x00" * 4,
    "OL": b"\x00" * 4,
    "OV": b"\x00" * 8,
    "OW": b"\x00\x00",
    "UN": b"",
}
TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_CLEAN = re.compile(
    r"\d{1,4}[-./]\d{1,2}[-./]\d{1,4}"  # dates in any common layout
    r"|\d{4,}"  # long digit runs: dates, IDs, phone numbers
    r"|[^\W_]+"  # words: replaced only when identifying
)


def empty_value(vr: str) -> Any:
    if vr in BINARY_VRS:
        return b""
    if vr in {"FL", "FD", "SL", "SS", "SV", "UL", "US", "UV", "AT", "DS", "IS"}:
        return None
    return ""


def shift_date(text: str, days: int) -> str:
    """Shift a DA value (``YYYYMMDD``, ACR-NEMA ``YYYY.MM.DD``, or a range ``A-B``)."""
    if "-" in text:
        return "-".join(shift_date(part, days) if part else "" for part in text.split("-"))
    s = text.strip().replace(".", "")
    if len(s) != 8 or not s.isdigit():
        return ""
    try:
        d = date(int(s[:4]), int(s[4:6]), int(s[6:])) + timedelta(days=days)
    except (ValueError, OverflowError):
        return ""
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"


def shift_datetime(text: str, days: int) -> str:
    """Shift the date part of a DT value; keep the time of day and the UTC offset."""
    s = text.strip()
    if "-" in s[1:] and not re.match(r"^\d{8,}.*[+-]\d{4}$", s):
        return "-".join(shift_datetime(p, days) if p else "" for p in s.split("-"))
    if len(s) >= 8 and s[:8].isdigit():
        head = shift_date(s[:8], days)
        return head + s[8:] if head else ""
    if len(s) in (4, 6) and s.isdigit():  # year or year+month: shift the middle of the period
        full = shift_date(s + ("0701" if len(s) == 4 else "15"), days)
        return full[: len(s)]
    return ""


def clean_text(text: str, identifying: frozenset[str]) -> str:
    """Replace identifying words, dates and long digit runs of ``text`` by ``*``."""

    def repl(m: re.Match[str]) -> str:
        word = m.group(0)
        if word[0].isdigit() and (len(word) >= 4 or not word.isdigit()):
            return "*"
        return "*" if word.lower() in identifying else word

    return _CLEAN.sub(repl, text)
