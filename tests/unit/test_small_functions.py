"""Pure helpers: backoff, DIMSE status classes, UID syntax, safe text."""

from __future__ import annotations

import pytest

from gateway.dicom.status import StatusClass, classify
from gateway.dicom.uids import is_valid_uid
from gateway.text import safe_text
from gateway.transfer.worker import backoff

# --- backoff ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 5.0), (1, 5.0), (2, 10.0), (3, 20.0), (4, 40.0), (7, 320.0), (8, 600.0), (50, 600.0)],
)
def test_backoff_is_exponential_with_a_cap(attempt: int, expected: float) -> None:
    assert backoff(attempt, initial=5, multiplier=2, cap=600) == expected
    assert isinstance(backoff(attempt, initial=5, multiplier=2, cap=600), float)


def test_backoff_multiplier_one_is_constant() -> None:
    assert [backoff(n, initial=3.0, multiplier=1.0, cap=600.0) for n in range(1, 6)] == [3.0] * 5


def test_backoff_is_monotonic() -> None:
    values = [backoff(n, initial=0.5, multiplier=1.7, cap=100.0) for n in range(1, 40)]
    assert values == sorted(values)
    assert values[-1] == 100.0


@pytest.mark.parametrize("multiplier", [2, 2.0, 10.0])
def test_backoff_huge_attempt_is_capped_not_an_overflow(multiplier: float) -> None:
    assert backoff(5000, initial=5.0, multiplier=multiplier, cap=600.0) == 600.0


# --- DIMSE status classes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (0x0000, StatusClass.SUCCESS),
        (0x0001, StatusClass.WARNING),
        (0xB000, StatusClass.WARNING),
        (0xB007, StatusClass.WARNING),
        (0xB006, StatusClass.WARNING),
        (0xA700, StatusClass.RETRYABLE),
        (0xA7FF, StatusClass.RETRYABLE),
        (0xA701, StatusClass.RETRYABLE),
        (0x0213, StatusClass.RETRYABLE),
        (0xA900, StatusClass.PERMANENT),
        (0xA9FF, StatusClass.PERMANENT),
        (0xC000, StatusClass.PERMANENT),
        (0xCFFF, StatusClass.PERMANENT),
        (0x0117, StatusClass.PERMANENT),
        (0x0110, StatusClass.PERMANENT),
        (0x0122, StatusClass.PERMANENT),
        (0xA800, StatusClass.PERMANENT),
    ],
    ids=lambda v: f"0x{v:04X}" if isinstance(v, int) else v.value,
)
def test_classify(status: int, expected: StatusClass) -> None:
    assert classify(status) is expected


# --- UIDs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uid",
    [
        "1.2",
        "0.0",
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.826.0.1.3680043.8.498.1",
        "2.25.329800735698586629295641978511506172918",
        "1." + "2" * 62,  # 64 characters
    ],
)
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "1",
        "1.",
        ".1",
        "1..2",
        "1.02",  # leading zero in a component
        "01.2",
        "1.2.a",
        "1.2 ",
        "1.2\x00",
        " 1.2",
        "1.2\n",
        "1.2.-3",
        "1." + "2" * 63,  # 65 characters
        "1,2",
        "\uff11.\uff12",  # fullwidth digits are not ASCII digits
    ],
)
def test_invalid_uids(uid: str) -> None:
    assert not is_valid_uid(uid)


@pytest.mark.parametrize("value", [None, 1.2, b"1.2", 12])
def test_non_string_is_not_a_uid(value: object) -> None:
    assert not is_valid_uid(value)


# --- safe_text ----------------------------------------------------------------------------


def test_safe_text_keeps_printable_ascii() -> None:
    assert safe_text("STORESCU 1.2-ok_") == "STORESCU 1.2-ok_"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A\nB", "A\\x0aB"),
        ("A\rB", "A\\x0dB"),
        ("\x00", "\\x00"),
        ("\x1b[31m", "\\x1b[31m"),
        ("\x7f", "\\x7f"),
        ("A\\B", "A\\x5cB"),
        ("é", "\\xe9"),
        ("Ω", "\\u03a9"),
        ("\u2028", "\\u2028"),
    ],
)
def test_safe_text_escapes(raw: str, expected: str) -> None:
    out = safe_text(raw)
    assert out == expected
    assert all(0x20 <= ord(c) < 0x7F for c in out)


def test_safe_text_escapes_astral_characters_unambiguously() -> None:
    out = safe_text("\U0001f600")
    assert all(0x20 <= ord(c) < 0x7F for c in out)
    assert out != safe_text("\u1f60" + "0")  # not confusable with a BMP char and a '0'
    assert out == "\\U0001f600"


def test_safe_text_length_is_bounded() -> None:
    assert safe_text("A" * 64) == "A" * 64
    assert safe_text("A" * 65) == "A" * 64 + "..."
    assert safe_text("A" * 10, limit=4) == "AAAA..."
    long_bad = safe_text("\n" * 1000)
    assert long_bad == "\\x0a" * 64 + "..."


def test_safe_text_of_non_strings() -> None:
    assert safe_text(12) == "12"
    assert safe_text(None) == "None"
    assert safe_text(b"\n") == "b'\\x5cn'"
