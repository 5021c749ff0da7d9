"""gateway.routing.match: conditions evaluated against a header and its association."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from gateway.config.rules import Condition, MatchAll, RuleError, parse_condition
from gateway.routing.match import matches


def _dataset() -> Dataset:
    ds = Dataset()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDescription = "CT HEAD w/o contrast"
    ds.SeriesDescription = "Scout"
    ds.StudyDate = "20240115"
    ds.Rows = 512
    ds.SliceThickness = "2.5"
    ds.InstanceNumber = "7"
    ds.AccessionNumber = ""
    ds.WindowCenter = ["40", "400"]
    return ds


FACTS = {
    "CalledAETitle": ["GATEWAY"],
    "CallingAETitle": ["CT1"],
    "CallingAddress": ["10.0.0.7"],
}


def _lookup(ds: Dataset) -> Any:
    """The same reading as gateway.ingest.service: values as strings, [] when absent/empty."""

    def lookup(attribute: str) -> list[str]:
        if attribute in FACTS:
            return FACTS[attribute]
        value = ds.get(attribute)
        if value is None or value == "":
            return []
        if isinstance(value, MultiValue | list):
            return [str(v) for v in value]
        return [str(value)]

    return lookup


def _m(rule: dict[str, Any], ds: Dataset | None = None) -> bool:
    cond: Condition = parse_condition(rule, "match")
    return matches(cond, _lookup(ds if ds is not None else _dataset()))


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"attribute": "Modality", "equals": "CT"}, True),
        ({"attribute": "Modality", "equals": "MR"}, False),
        ({"attribute": "Modality", "equals": "ct"}, False),  # case-sensitive
        ({"attribute": "Rows", "equals": 512}, True),
        ({"attribute": "Rows", "equals": 512.0}, True),
        ({"attribute": "Rows", "equals": "512"}, True),
        ({"attribute": "Rows", "equals": 511}, False),
        ({"attribute": "SliceThickness", "equals": 2.5}, True),
        ({"attribute": "Modality", "equals": 1}, False),  # text is not a number
        ({"attribute": "Modality", "one_of": ["MR", "CT"]}, True),
        ({"attribute": "Modality", "one_of": ["MR", "PT"]}, False),
        ({"attribute": "InstanceNumber", "one_of": [1, 7]}, True),
        ({"attribute": "StudyDescription", "regex": "(?i)head"}, True),
        ({"attribute": "StudyDescription", "regex": "^HEAD"}, False),  # search, anchored
        ({"attribute": "StudyDescription", "regex": "head"}, False),
        ({"attribute": "Rows", "range": [256, 1024]}, True),
        ({"attribute": "Rows", "range": [512, 512]}, True),  # inclusive
        ({"attribute": "Rows", "range": [513, 1024]}, False),
        ({"attribute": "Rows", "range": [0.5, 511.9]}, False),
        ({"attribute": "SliceThickness", "range": [2, 3]}, True),
        ({"attribute": "Modality", "range": [0, 10]}, False),  # not a number
        ({"attribute": "StudyDate", "range": ["20240101", "20241231"]}, True),
        ({"attribute": "StudyDate", "range": ["20240115", "20240115"]}, True),
        ({"attribute": "StudyDate", "range": ["20240116", "20241231"]}, False),
        ({"attribute": "Modality", "present": True}, True),
        ({"attribute": "Modality", "absent": True}, False),
        ({"attribute": "Modality", "present": False}, False),
        ({"attribute": "Modality", "absent": False}, True),
    ],
)
def test_operators(rule: dict[str, Any], expected: bool) -> None:
    assert _m(rule) is expected


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"attribute": "ImageType", "equals": "AXIAL"}, True),
        ({"attribute": "ImageType", "equals": "ORIGINAL"}, True),
        ({"attribute": "ImageType", "equals": "LOCALIZER"}, False),
        ({"attribute": "ImageType", "one_of": ["DERIVED", "PRIMARY"]}, True),
        ({"attribute": "ImageType", "regex": "^AX"}, True),
        ({"attribute": "ImageType", "regex": "^LOC"}, False),
        ({"attribute": "WindowCenter", "range": [100, 500]}, True),  # any value
        ({"attribute": "WindowCenter", "range": [500, 900]}, False),
        ({"attribute": "WindowCenter", "equals": 400}, True),
    ],
)
def test_multi_valued_attribute_matches_any_value(rule: dict[str, Any], expected: bool) -> None:
    assert _m(rule) is expected


@pytest.mark.parametrize(
    ("op", "value"),
    [
        ("equals", "X"),
        ("one_of", ["X", ""]),
        ("regex", ".*"),
        ("regex", ""),
        ("range", ["", "zzzz"]),
        ("range", [-1e9, 1e9]),
    ],
)
@pytest.mark.parametrize("attribute", ["PatientName", "AccessionNumber"])
def test_missing_or_empty_attribute_matches_only_absent(
    attribute: str, op: str, value: Any
) -> None:
    # PatientName is missing altogether; AccessionNumber is present but empty
    assert _m({"attribute": attribute, op: value}) is False
    assert _m({"attribute": attribute, "absent": True}) is True
    assert _m({"attribute": attribute, "present": True}) is False
    assert _m({"not": {"attribute": attribute, op: value}}) is True


def test_association_facts() -> None:
    assert _m({"attribute": "CalledAETitle", "equals": "GATEWAY"})
    assert _m({"attribute": "CallingAETitle", "one_of": ["CT1", "CT2"]})
    assert not _m({"attribute": "CallingAETitle", "equals": "MR1"})
    assert _m({"attribute": "CallingAddress", "regex": r"^10\.0\.0\."})
    assert _m({"attribute": "CallingAddress", "present": True})


def test_combinators() -> None:
    ct = {"attribute": "Modality", "equals": "CT"}
    mr = {"attribute": "Modality", "equals": "MR"}
    scout = {"attribute": "SeriesDescription", "regex": "(?i)scout"}
    assert _m({"all": [ct]})
    assert not _m({"all": [ct, mr]})
    assert _m({"any": [mr, ct]})
    assert not _m({"any": [mr, mr]})
    assert not _m({"not": ct})
    assert _m({"not": mr})
    assert _m({"not": {"not": ct}})
    assert not _m({"all": [ct, {"not": scout}]})  # the scout is excluded
    assert _m({"all": [ct, {"any": [mr, {"attribute": "CallingAETitle", "equals": "CT1"}]}]})
    ds = _dataset()
    ds.SeriesDescription = "Axial 2.5"
    assert _m({"all": [ct, {"not": scout}]}, ds)


def test_match_all() -> None:
    assert matches(MatchAll(), _lookup(Dataset()))


def test_range_strings_compare_stripped_text() -> None:
    ds = Dataset()
    ds.StudyDate = "20251231"
    assert _m({"attribute": "StudyDate", "range": ["20250101", "20251231"]}, ds)
    ds.StudyDate = "20260101"
    assert not _m({"attribute": "StudyDate", "range": ["20250101", "20251231"]}, ds)


def test_equals_strips_padding_regex_sees_raw_value() -> None:
    def lookup(attribute: str) -> list[str]:
        return [" CT "]

    cond = parse_condition({"attribute": "Modality", "equals": "CT"}, "m")
    assert matches(cond, lookup)  # padding is stripped for equals
    cond = parse_condition({"attribute": "Modality", "regex": "^CT$"}, "m")
    assert not matches(cond, lookup)  # regex sees the raw value


@pytest.mark.parametrize(
    ("rule", "key"),
    [
        ({"attribute": "Modality"}, "m"),
        ({"equals": "CT"}, "m"),
        ({"attribute": "Modality", "one_of": []}, "m.one_of"),
        ({"attribute": "Modality", "present": "yes"}, "m.present"),
        ({"attribute": "Rows", "range": [1]}, "m.range"),
        ({"all": [{"attribute": "Modality", "equals": "CT"}], "any": []}, "m"),
        ({"not": {"attribute": "Modality", "regex": "["}}, "m.not.regex"),
        ("CT", "m"),
    ],
)
def test_parse_errors_name_the_key(rule: Any, key: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_condition(rule, "m")
    assert info.value.key == key
