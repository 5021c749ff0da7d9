"""PS3.4 C.2.2.2 attribute matching (gateway/qr/matching.py): each matching type, escaping of
the SQL pattern characters and ranges; the in-memory matcher agrees with the LIKE/GLOB
patterns it hands to SQL."""

from __future__ import annotations

import re

import pytest

from gateway.qr.matching import (
    MAX_UIDS,
    MatchingError,
    Range,
    Single,
    UIDList,
    Universal,
    Wildcard,
    glob_pattern,
    like_literal,
    like_pattern,
    matches,
    multi_value_matches,
    parse,
    wildcard_regex,
)

# --- C.2.2.2.1 single value -------------------------------------------------------------------


def test_single_value_is_exact_and_pn_folds_case() -> None:
    assert parse("LO", "PID-1") == Single("PID-1")
    assert matches(parse("LO", "PID-1"), "PID-1", vr="LO")
    assert not matches(parse("LO", "PID-1"), "pid-1", vr="LO")  # case-sensitive but PN
    assert not matches(parse("LO", "PID-1"), "PID-10", vr="LO")
    assert matches(parse("PN", "doe^jane"), "DOE^Jane", vr="PN")
    assert not matches(parse("PN", "doe^jane"), "DOE^Janet", vr="PN")


def test_leading_and_trailing_spaces_are_not_significant() -> None:
    assert parse("SH", "  ACC1 ") == Single("ACC1")
    assert matches(parse("SH", "ACC1"), "ACC1 ", vr="SH")  # stored with its padding


# --- C.2.2.2.2 list of UIDs -------------------------------------------------------------------


def test_uid_list_matches_any_listed_uid() -> None:
    m = parse("UI", "1.2.3\\1.2.4\\ ")
    assert m == UIDList(("1.2.3", "1.2.4"))
    assert matches(m, "1.2.4", vr="UI")
    assert not matches(m, "1.2.5", vr="UI")
    assert parse("UI", "1.2.3\x00") == Single("1.2.3")  # UI padding
    assert parse("UI", "\\") == Universal()


def test_uid_list_is_bounded() -> None:
    with pytest.raises(MatchingError):
        parse("UI", "\\".join(f"1.2.{i}" for i in range(MAX_UIDS + 1)))


def test_uids_take_no_wildcards() -> None:
    assert parse("UI", "1.2.*") == Single("1.2.*")  # literal: no UI value has a '*'
    assert not matches(parse("UI", "1.2.*"), "1.2.3", vr="UI")


# --- C.2.2.2.3 universal ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", " ", "*", "**"])
def test_universal_matching(value: str) -> None:
    assert parse("PN", value) == Universal()
    assert matches(parse("PN", value), "", vr="PN")
    assert matches(parse("PN", value), "Anything", vr="PN")


def test_a_lone_star_on_a_date_is_not_universal() -> None:
    assert parse("DA", "*") == Single("*")  # DA takes no wildcards (C.2.2.2.4)


# --- C.2.2.2.4 wild cards ---------------------------------------------------------------------


def test_star_and_question_mark() -> None:
    assert parse("PN", "Do*") == Wildcard("Do*")
    assert matches(parse("PN", "Do*"), "DOE^JANE", vr="PN")
    assert matches(parse("PN", "Do*"), "Do", vr="PN")  # '*' matches no character too
    assert matches(parse("PN", "D?e*"), "Doe^J", vr="PN")
    assert not matches(parse("PN", "D?e*"), "De^J", vr="PN")  # '?' is exactly one
    assert matches(parse("LO", "ab*cd"), "abXXcd", vr="LO")
    assert not matches(parse("LO", "ab*cd"), "ABxcd", vr="LO")  # case-sensitive


@pytest.mark.parametrize("vr", ["DA", "TM", "DT", "UI", "US", "FD"])
def test_no_wildcards_for_these_vrs(vr: str) -> None:
    assert not isinstance(parse(vr, "12*"), Wildcard)


@pytest.mark.parametrize("literal", ["100%", "a_b", "back\\slash", "[x]", "(.*)", "'"])
def test_sql_and_regex_characters_are_literal(literal: str) -> None:
    pattern = f"*{literal}*"
    m = parse("LO", pattern)
    assert isinstance(m, Wildcard)
    assert matches(m, f"x{literal}y", vr="LO")
    # '%' and '_' are no wildcards: the same length of other characters does not match
    assert not matches(m, "x" + "Q" * len(literal) + "y", vr="LO")
    regex = wildcard_regex(pattern)
    assert regex.fullmatch(f"-{literal}-") and not regex.fullmatch("-" + "Z" * len(literal) + "-")


def test_like_pattern_escapes_percent_underscore_and_the_escape() -> None:
    assert like_pattern("a%b_c\\d*e?f") == "a\\%b\\_c\\\\d%e_f"
    assert like_pattern("x!y%", escape="!") == "x!!y!%"
    assert like_literal("50%_off\\") == "50\\%\\_off\\\\"
    assert like_literal("a*b?") == "a*b?"  # no wildcard in a literal


def test_glob_pattern_brackets_the_bracket() -> None:
    assert glob_pattern("[ab]*?") == "[[]ab]*?"


def _like_to_regex(pattern: str, escape: str = "\\") -> re.Pattern[str]:
    """A reference LIKE: ``%`` any run, ``_`` one character, ``escape`` makes the next literal."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == escape:
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if c == "%" else "." if c == "_" else re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


@pytest.mark.parametrize(
    ("pattern", "stored"),
    [
        ("*100%_x", "Study a 100%_x"),
        ("*100%_x", "Study a 100AB x"),
        ("a\\b*", "a\\bc"),
        ("a\\b*", "aXbc"),
        ("?_?", "a_b"),
        ("?_?", "abc"),
        ("%", "%"),
        ("%", "anything"),
    ],
)
def test_like_pattern_agrees_with_in_memory_matching(pattern: str, stored: str) -> None:
    expected = matches(Wildcard(pattern), stored, vr="LO")
    assert bool(_like_to_regex(like_pattern(pattern)).fullmatch(stored)) is expected


# --- C.2.2.2.5 ranges -------------------------------------------------------------------------


def test_date_ranges_are_inclusive_and_open_ended() -> None:
    assert parse("DA", "20240101-20240331") == Range("20240101", "20240331")
    assert parse("DA", "20240101-") == Range("20240101", "")
    assert parse("DA", "-20240331") == Range("", "20240331")
    closed = parse("DA", "20240101-20240331")
    assert matches(closed, "20240101", vr="DA") and matches(closed, "20240331", vr="DA")
    assert not matches(closed, "20231231", vr="DA") and not matches(closed, "20240401", vr="DA")
    assert matches(parse("DA", "20240101-"), "29991231", vr="DA")
    assert matches(parse("DA", "-20240331"), "19000101", vr="DA")
    assert not matches(closed, "", vr="DA")  # an empty value is in no range


def test_time_upper_bound_covers_its_unit() -> None:
    m = parse("TM", "0800-1200")
    assert matches(m, "120059.999", vr="TM")  # 12:00 covers the whole minute
    assert not matches(m, "120100", vr="TM")
    assert matches(m, "0800", vr="TM") and not matches(m, "075959", vr="TM")


def test_datetime_ranges_with_utc_offsets() -> None:
    assert parse("DT", "20240101-20240102") == Range("20240101", "20240102")
    assert parse("DT", "20240101120000-0500-20240102") == Range("20240101120000-0500", "20240102")
    assert parse("DT", "-20240102+0100") == Range("", "20240102+0100")
    with pytest.raises(MatchingError):
        parse("DT", "2024-01-01-2024")


def test_a_range_needs_a_bound() -> None:
    with pytest.raises(MatchingError):
        parse("DA", "-")


def test_a_hyphen_is_no_range_outside_da_tm_dt() -> None:
    assert parse("LO", "PID-1") == Single("PID-1")


# --- multi-valued stored values (Modalities in Study) ----------------------------------------


def test_multi_valued_stored_and_requested_values() -> None:
    assert multi_value_matches(parse("CS", "CT"), "CT\\MR", vr="CS")
    assert not multi_value_matches(parse("CS", "US"), "CT\\MR", vr="CS")
    assert multi_value_matches(parse("CS", "US\\MR"), "CT\\MR", vr="CS")  # any of the keys
    assert multi_value_matches(parse("CS", "M?"), "CT\\MR", vr="CS")
    assert multi_value_matches(parse("CS", ""), "", vr="CS")
