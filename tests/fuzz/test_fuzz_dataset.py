"""Received data sets: whatever the bytes, ``read_header`` returns a data set or refuses it with
IngestError 0xC000, and every value ingest and routing read from a data set it returned comes
back as text (or nothing) -- never another exception.

Inputs are a valid instance with bytes overwritten, cut or inserted (length fields above all),
and files whose data set is a run of crafted elements (any tag, VR and declared length)."""

from __future__ import annotations

import struct
import tempfile
import warnings
from io import BytesIO
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st
from pydicom.datadict import keyword_for_tag
from pydicom.uid import generate_uid

from gateway.dicom.status import CANNOT_UNDERSTAND
from gateway.dicom.uids import is_valid_uid
from gateway.errors import IngestError
from gateway.ingest.parse import read_header
from gateway.ingest.service import _text
from tests.support.datasets import build_instance

from .settings import fuzz

# what ingest and routing read (gateway/ingest/service.py: _validate, _summaries, _route)
INGEST_KEYWORDS = [
    "SOPInstanceUID",
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "Rows",
    "Columns",
    "InstanceNumber",
]


def _valid_file() -> bytes:
    ds = build_instance(
        rows=4, cols=4, sop_instance_uid="1.2.3.4", study_uid="1.2.3", series_uid="1.2.3.5"
    )
    ds.ReferencedImageSequence = []
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


VALID = _valid_file()
PREFIX_END = VALID.index(b"\x08\x00\x05\x00")  # the data set starts at SpecificCharacterSet
PREFIX = VALID[:PREFIX_END]  # preamble, DICM and file meta (Explicit VR Little Endian)


def check(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.dcm"
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = read_header(path, max_depth=64)
            except IngestError as exc:
                assert exc.status == CANNOT_UNDERSTAND, exc
                return
            keywords = INGEST_KEYWORDS + [keyword_for_tag(t) for t in ds.keys()]
            for keyword in keywords:
                if keyword:
                    value = _text(ds, keyword, 65)
                    assert isinstance(value, str)
                    assert is_valid_uid(value) in (True, False)


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["byte", "length16", "length32", "cut", "insert", "delete"]))
        if kind == "byte":
            data[at] = draw(st.integers(0, 255))
        elif kind == "length16":
            data[at : at + 2] = struct.pack("<H", draw(st.sampled_from([0, 1, 3, 0xFFFF])))
        elif kind == "length32":
            data[at : at + 4] = struct.pack(
                "<L", draw(st.sampled_from([0, 1, 0xFFFFFFFF, 1 << 30]))
            )
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at : at + draw(st.integers(1, 16))]
        if not data:
            break
    return bytes(data)


VRS = [
    "AE",
    "AS",
    "AT",
    "CS",
    "DA",
    "DS",
    "DT",
    "FD",
    "FL",
    "IS",
    "LO",
    "LT",
    "OB",
    "OD",
    "OF",
    "OL",
    "OV",
    "OW",
    "PN",
    "SH",
    "SL",
    "SQ",
    "SS",
    "ST",
    "SV",
    "TM",
    "UC",
    "UI",
    "UL",
    "UN",
    "UR",
    "US",
    "UT",
    "UV",
    "XX",
]
TAGS = [
    0x00080016,
    0x00080018,
    0x00080060,
    0x00100010,
    0x00100020,
    0x0020000D,
    0x0020000E,
    0x00200011,
    0x00280010,
    0x00280011,
    0x00081115,
    0x00089215,
    0x7FE00010,
    0x00091010,
    0x00090010,
    0xFFFEE000,
    0xFFFEE00D,
    0xFFFEE0DD,
    0x00020010,
    0x00000000,
]


def element(tag: int, vr: str, length: int, value: bytes) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if tag >> 16 == 0xFFFE:  # item and delimiters have no VR
        return head + struct.pack("<L", length) + value
    if vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"):
        return head + vr.encode() + b"\0\0" + struct.pack("<L", length) + value
    return head + vr.encode() + struct.pack("<H", length & 0xFFFF) + value


@st.composite
def crafted_files(draw: st.DrawFn) -> bytes:
    parts = [PREFIX]
    for _ in range(draw(st.integers(0, 12))):
        tag = draw(st.sampled_from(TAGS) | st.integers(0, 0xFFFFFFFF))
        vr = draw(st.sampled_from(VRS))
        value = draw(st.binary(max_size=20))
        length = draw(st.sampled_from([len(value), 0, 0xFFFFFFFF, len(value) + 1, 0xFFFF]))
        parts.append(element(tag, vr, length, value))
    return b"".join(parts)


@fuzz(ci_examples=150)
@given(mutated_files())
@example(VALID)
@example(VALID[:200])
def test_mutated_instances(data: bytes) -> None:
    check(data)


@fuzz(ci_examples=150)
@given(crafted_files())
@example(PREFIX + element(0x00280010, "US", 3, b"\x00\x00\x00"))  # Rows: was BytesLengthException
@example(PREFIX + element(0x00080060, "SQ", 1, b"\x00"))  # Modality as a sequence
@example(PREFIX + element(0x00200011, "IS", 3, b"abc"))  # SeriesNumber not a number
@example(PREFIX + element(0x0020000D, "UI", 8, generate_uid()[:8].encode()))
def test_crafted_elements(data: bytes) -> None:
    check(data)
