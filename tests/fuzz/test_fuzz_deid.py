"""De-identification profiles and burned-in pixel rules: any document gives a profile (rules)
or a ProfileError naming the file -- never another exception; a rule's condition evaluated on
any data set, hostile values included, answers True or False."""

from __future__ import annotations

import copy
import tomllib
import warnings
from pathlib import Path
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from gateway.deid.pixel_rules import Rule, at_risk, load_rules, parse_rules, signature
from gateway.deid.profiles import Profile, parse_profile
from gateway.errors import ProfileError

from .settings import fuzz
from .toml_text import dumps, paths

PROFILES = Path(__file__).resolve().parents[2] / "deid_profiles"
BASES = [tomllib.loads((PROFILES / f"{n}.toml").read_text()) for n in ("basic", "research")]
RULE_FILES = sorted((PROFILES / "pixels").glob("*.toml"))
RULE_BASES = [tomllib.loads(p.read_text()) for p in RULE_FILES]

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 65535, 65536, 36501, -36501]),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(
        [
            "D",
            "Z",
            "X",
            "K",
            "C",
            "U",
            "keep",
            "replace",
            "remove",
            "PN",
            "SQ",
            "(60xx,4000)",
            "(0009,xx10)",
            "PatientName",
            "0010",
            "xyz",
            "{digest:12}",
            "{digest:99}",
            "{",
            "(",
            "ultrasound-regions",
            "retain_safe_private",
            "2026c",
            "verify",
            "rle",
            "pixels",
            "Rows",
            "Manufacturer",
            "ImageType",
        ]
    ),
    st.dates(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(
                [
                    "tag",
                    "tags",
                    "private",
                    "vr",
                    "action",
                    "value",
                    "when",
                    "creator",
                    "group",
                    "element",
                    "attribute",
                    "equals",
                    "contains",
                    "regex",
                    "one_of",
                    "present",
                    "all",
                    "any",
                    "not",
                    "top",
                    "x",
                    "y",
                    "width",
                    "height",
                    "clean",
                    "rules",
                    "ocr",
                    "allow",
                    "encode",
                    "max_pixel_bytes",
                    "ocr_scale",
                ]
            )
            | st.text(min_size=1, max_size=8),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=12,
)


def mutate(bases: list[dict[str, Any]], extra_keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    @st.composite
    def strategy(draw: st.DrawFn) -> dict[str, Any]:
        doc = copy.deepcopy(draw(st.sampled_from(bases)))
        where = paths(doc)
        for _ in range(draw(st.integers(1, 4))):
            path = draw(st.sampled_from(where))
            parent: Any = doc
            try:
                for part in path[:-1]:
                    parent = parent[part]
                if draw(st.booleans()):
                    parent[path[-1]] = draw(values)
                elif isinstance(parent, dict):
                    parent[draw(st.sampled_from(extra_keys))] = draw(values)
                elif isinstance(parent, list):
                    parent.append(draw(values))
            except (KeyError, IndexError, TypeError):
                continue  # an earlier mutation replaced what this path went through
        return doc

    return strategy()


def _profile(text: str) -> None:
    path = str(PROFILES / "fuzzed.toml")  # [pixels] rules = "pixels" resolves beside it
    try:
        profile = parse_profile(text, path=path, name="fuzzed")
    except ProfileError as exc:
        assert exc.path == path, exc
        return
    assert isinstance(profile, Profile)


def _rules(text: str) -> list[Rule]:
    try:
        rules = parse_rules(text, path="rules.toml")
    except ProfileError as exc:
        assert exc.path == "rules.toml", exc
        return []
    assert all(isinstance(r, Rule) for r in rules)
    return rules


ITEM_KEYS = ["tag", "tags", "private", "vr", "action", "value", "when", "name", "pixels", "x"]


@fuzz(ci_examples=200)
@given(mutate(BASES, ITEM_KEYS))
@example({"item": [{"vr": ["PN"], "action": "X"}]})  # was TypeError: unhashable type 'list'
@example({"item": [{"tag": "PatientName", "action": ["X"]}]})  # was TypeError
@example({"item": [{"tag": "PatientName", "action": "X", "when": [1]}]})  # was TypeError
@example({"item": [{"tag": "PatientName", "action": "X", "when": {"Modality": 1}}]})  # TypeError
@example({"item": [{"private": {"creator": "A", "group": "zz"}, "action": "X"}]})
@example({"pixels": {"clean": True, "rules": "no-such-folder"}})
def test_mutated_profiles(doc: dict[str, Any]) -> None:
    _profile(dumps(doc))


TEXT_PIECES = [
    "[[item]]",
    "[pixels]",
    "[pseudonyms]",
    "[dates]",
    "tag = 'PatientName'",
    "action = 'X'",
    "vr = 'PN'",
    "when = {",
    "}",
    "[",
    "]",
    "shift_days = [1, 2]",
    "options = ['x']",
    "\n",
    "=",
    "'",
    '"',
    "private = {creator = 'A'}",
    "[[rule]]",
    "name = 'r'",
    "match = {",
    "regions = [",
    "{ top = 1 }",
    "attribute = 'Rows'",
    "equals = 1",
    "not = {",
    "all = [",
]


@fuzz(ci_examples=150)
@given(st.text(max_size=200) | st.lists(st.sampled_from(TEXT_PIECES), max_size=40).map("\n".join))
@example("a = " + "[" * 2000 + "]" * 2000)  # was RecursionError out of tomllib
def test_any_profile_text(text: str) -> None:
    _profile(text)
    _rules(text)


RULE_KEYS = ["name", "device", "match", "regions", "keep", "attribute", "all", "not"]


@fuzz(ci_examples=200)
@given(mutate(RULE_BASES, RULE_KEYS))
@example({"rule": [{"name": "r", "match": {"attribute": "Rows", "equals": 1}, "regions": 5}]})
@example({"rule": [{"name": "r", "match": {"attribute": "Rows", "present": True}, "keep": []}]})
def test_mutated_pixel_rules(doc: dict[str, Any]) -> None:
    _rules(dumps(doc))


# -- rules evaluated on hostile data sets ------------------------------------------------------

ATTRIBUTES = [
    (0x00080060, "CS"),  # Modality
    (0x00080070, "LO"),  # Manufacturer
    (0x00081090, "LO"),  # ManufacturerModelName
    (0x00280010, "US"),  # Rows
    (0x00280011, "US"),  # Columns
    (0x00080008, "CS"),  # ImageType
    (0x00280301, "CS"),  # BurnedInAnnotation
    (0x0008103E, "LO"),  # SeriesDescription
    (0x00080016, "UI"),  # SOPClassUID
]


Raw = list[tuple[int, str, bytes]]

hostile_elements = st.lists(
    st.tuples(
        st.sampled_from([tag for tag, _vr in ATTRIBUTES]),
        st.sampled_from(["CS", "LO", "UI", "US", "DS", "IS", "SQ", "UN", "OB", "FD", "PN", "AT"]),
        st.binary(max_size=24),
    ),
    max_size=6,
    unique_by=lambda e: e[0],
)


def dataset_of(elements: Raw) -> Dataset:
    """Raw (undecoded) elements with any VR and bytes, as a received file gives them."""
    ds = Dataset()
    for tag, vr, value in elements:
        ds[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    return ds


SAMPLE_RULES = load_rules(PROFILES / "pixels")


@fuzz(ci_examples=300)
@given(hostile_elements)
@example([])
@example([(0x00280010, "US", b"\x00\x00\x00")])  # Rows: was BytesLengthException
@example([(0x00080060, "DS", b"x")])
@example([(0x00080060, "SQ", b"\x00")])  # Modality as SQ: was OSError out of at_risk
def test_rules_on_hostile_datasets(elements: Raw) -> None:
    ds = dataset_of(elements)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rule = SAMPLE_RULES.first_match(ds)
        assert rule is None or isinstance(rule, Rule)
        reason = at_risk(ds)
        assert reason is None or isinstance(reason, str)
        assert isinstance(signature(ds), str)
