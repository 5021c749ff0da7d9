"""Random datasets with a marker in a random element, VR and depth: none survives ``basic``,
and the leak gate quarantines every case where a profile deliberately keeps the marker."""

from __future__ import annotations

from io import BytesIO

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from gateway.deid import deidentify, leak_check
from gateway.deid.profiles import parse_profile

from .conftest import base_dataset

# (tag, VR, profile target to keep it)
PLACES = [
    (0x00100010, "PN", "(0010,0010)"),
    (0x00101000, "LO", "(0010,1000)"),  # Other Patient IDs
    (0x00081030, "LO", "(0008,1030)"),
    (0x00204000, "LT", "(0020,4000)"),
    (0x00321060, "LO", "(0032,1060)"),
    (0x00400254, "LO", "(0040,0254)"),
    (0x0040A160, "UT", "(0040,A160)"),
    (0x0040A123, "PN", "(0040,A123)"),
    (0x00100012, "PN", "(0010,0012)"),  # Name to Use: newer than pydicom's dictionary
    (0x00209999, "SH", "(0020,9999)"),  # unknown public
    (0x00189998, "UC", "(0018,9998)"),
    (0x00189997, "ST", "(0018,9997)"),
    (0x00189996, "UN", "(0018,9996)"),
    (0x00101040, "UN", "(0010,1040)"),  # known public, UN-encoded
    (0x00091010, "LO", "(0009,xx10)"),
    (0x00091011, "UN", "(0009,xx11)"),
    (0x00091012, "UT", "(0009,xx12)"),
    (0x60020022, "LO", "(60xx,0022)"),
    (0x60004000, "LT", "(60xx,4000)"),
    (0x50002500, "LO", "(50xx,2500)"),
]
CONTAINERS = [  # sequences the basic profile keeps and descends
    (0x00082218, "(0008,2218)"),  # Anatomic Region Sequence (unlisted: kept, cleaned)
    (0x00081140, "(0008,1140)"),  # Referenced Image Sequence (X/Z/U*: kept, cleaned)
    (0x0040A730, "(0040,A730)"),  # Content Sequence (D: cleaned)
    (0x00091020, "(0009,xx20)"),  # a private sequence
]

marker = st.from_regex(r"ZQ[A-Z]{6}[0-9]{2}", fullmatch=True)


@st.composite
def cases(draw: st.DrawFn) -> tuple[Dataset, str, list[str]]:
    ds = base_dataset()
    ds.add_new(0x00090010, "LO", "RANDOM CREATOR")
    value = draw(marker)
    tag, vr, target = draw(st.sampled_from(PLACES))
    depth = draw(st.integers(0, 3))
    path = [draw(st.sampled_from(CONTAINERS)) for _ in range(depth)]
    leaf = Dataset()
    if tag >> 16 & 1:
        leaf.add_new(0x00090010, "LO", "RANDOM CREATOR")
    text = f"{value}^X" if vr == "PN" else f"a {value} b"
    raw = text.encode() + b" " * (len(text) % 2)
    leaf[tag] = DataElement(tag, vr, raw if vr == "UN" else text)
    node = leaf
    for ctag, _ in reversed(path):
        parent = Dataset()
        if ctag >> 16 & 1:
            parent.add_new(0x00090010, "LO", "RANDOM CREATOR")
        parent.add_new(ctag, "SQ", Sequence([node]))
        node = parent
    for elem in node:
        ds[elem.tag] = elem
    return ds, value, [target] + [t for _, t in path]


def _encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_no_random_marker_survives_basic(key, basic, case) -> None:
    ds, value, _targets = case
    assert value.encode() in _encode(ds)
    out, _ = deidentify(ds, basic, key)
    data = _encode(out)
    assert value.encode() not in data
    assert leak_check(ds, data) == []


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_gate_catches_a_profile_that_keeps_the_marker(key, case) -> None:
    ds, value, targets = case
    tags = ", ".join(f'"{t}"' for t in targets)
    profile = parse_profile(f'[[item]]\ntags = [{tags}]\naction = "keep"\n', path="keeps.toml")
    out, _ = deidentify(ds, profile, key)
    data = _encode(out)
    assert value.encode() in data  # the profile kept it
    assert leak_check(ds, data) != []
