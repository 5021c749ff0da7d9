from __future__ import annotations

from pathlib import Path

import pytest

from gateway.deid import load_profile
from gateway.deid.profiles import parse_profile, parse_tag_target
from gateway.errors import ProfileError

from .conftest import PROFILES


def test_shipped_profiles_load() -> None:
    basic = load_profile("basic", PROFILES)
    research = load_profile("research", PROFILES)
    assert basic.options == frozenset()
    assert research.options == {
        "retain_longitudinal_modified_dates",
        "retain_patient_characteristics",
        "retain_device_identity",
        "retain_safe_private",
        "clean_descriptors",
        "clean_structured_content",
        "clean_graphics",
    }
    assert load_profile(str(PROFILES / "basic.toml")).sha256 == basic.sha256


def test_default_search_finds_repo_profiles() -> None:
    assert load_profile("basic").name == "basic"


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        (
            'name = "x"\noptions = [\n  "retain_uids",\n  "retain_everything",\n]\n',
            4,
            "unknown option",
        ),
        (
            'name = "x"\n[[item]]\ntag = "PatientName"\naction = "keep"\n'
            '[[item]]\ntag = "Nope"\naction = "X"\n',
            5,
            "unknown keyword",
        ),
        ('name = "x"\n\n[[item]]\ntag = "(0010,0010)"\naction = "scramble"\n', 3, "unknown action"),
        ('name = "x"\ncolour = "blue"\n', 2, "unknown key"),
        ('name = "x"\noptions = [\n', 3, "not TOML"),
        (
            'options = ["retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"]\n',
            1,
            "exclude",
        ),
        ('[[item]]\ntag = "PatientName"\naction = "replace"\n', 1, "value"),
        ('[pseudonyms]\npatient_id = "P-{name}"\n', 2, "digest"),
    ],
)
def test_bad_profiles_are_refused_with_file_line_reason(text: str, line: int, reason: str) -> None:
    with pytest.raises(ProfileError) as exc:
        parse_profile(text, path="bad.toml")
    assert exc.value.path == "bad.toml"
    assert exc.value.line == line
    assert reason in exc.value.reason
    assert str(exc.value).startswith(f"bad.toml:{line}: ")


def test_unknown_profile_name(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no profile"):
        load_profile("absent", tmp_path)


def test_tag_targets() -> None:
    t = parse_tag_target("(60xx,4000)")
    assert (0x60024000 & t.mask) == t.value and (0x60024010 & t.mask) != t.value
    t = parse_tag_target("(0009,xx10)")
    assert (0x00091010 & t.mask) == t.value and (0x00091011 & t.mask) != t.value
    assert parse_tag_target("NameToUse").value == 0x00100012  # newer than pydicom's dictionary
    assert parse_tag_target("00100010").value == 0x00100010
