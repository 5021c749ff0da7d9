"""The leak gate reads text straight from element bytes (``leak._decoded``) instead of through
pydicom's conversion. It must see exactly the text pydicom's conversion gives, or a value could
hide from the gate (or a coded value passed through unchanged could look changed). Each case is
written by pydicom, read back raw, and compared with pydicom's own conversion of the same bytes.
"""

from __future__ import annotations

import warnings
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from gateway.deid import leak

# (keyword, VR, value as written) - padding, multiple values, odd spaces, non-numbers in numbers
CASES: list[tuple[str, str, object]] = [
    ("PatientID", "LO", "BENCH-MR"),
    ("PatientID", "LO", "  leading and trailing  "),
    ("OtherPatientIDs", "LO", ["ID1", " ID2 ", ""]),
    ("AccessionNumber", "SH", "ACC0001"),
    ("StationName", "SH", "ct-1\x00"),
    ("InstitutionName", "LO", "Hôpital Saint-Éloi"),
    ("InstitutionAddress", "ST", "1 Main St\\Apt 2\r\nSpringfield  "),
    ("AdditionalPatientHistory", "LT", "history with \\ backslash "),
    ("TextValue", "UT", "free text  \x00"),
    ("StrainDescription", "UC", ["a", "b c "]),
    ("RetrieveURL", "UR", "https://pacs.example/x?y=1  "),
    ("ImageType", "CS", ["ORIGINAL", "PRIMARY", " AXIAL "]),
    ("PatientSex", "CS", "O"),
    ("PatientAge", "AS", "045Y"),
    ("StudyDate", "DA", "20240115"),
    ("AcquisitionDateTime", "DT", "20240115101500.123456+0100 "),
    ("StudyTime", "TM", "101500.5"),
    ("StudyInstanceUID", "UI", "1.2.826.0.1.3680043.8.498.1"),
    ("ReferencedSOPInstanceUID", "UI", "1.2.3"),
    ("SliceThickness", "DS", "2.5"),
    ("ImagePositionPatient", "DS", ["-80.0", " -80.0", "2.5 "]),
    ("SeriesNumber", "IS", "0012"),
    ("InstanceNumber", "IS", ["1", " 22 ", "3"]),
    ("RetrieveAETitle", "AE", [" STORESCU ", "B"]),
    ("StationAETitle", "AE", "NODE_A"),
    ("SliceThickness", "DS", "BENCH-MR"),  # not a number: pydicom falls back to text
    ("SeriesNumber", "IS", "JOHNDOE"),
    ("PatientComments", "LT", ""),
    ("PatientID", "LO", ""),
]


def _written(ds: Dataset, ts: str) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    buf = BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, implicit_vr=ts == ImplicitVRLittleEndian, little_endian=True)
    return dcmread(BytesIO(buf.getvalue()), force=True)


def _compare(read: Dataset) -> int:
    encodings = leak._encodings(read)
    compared = 0
    for tag in list(read.keys()):
        raw = read.get_item(tag)
        if not isinstance(raw, RawDataElement):
            continue  # Specific Character Set, converted when the encodings were read
        fast = leak._decoded(raw, encodings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            elem = read[tag]
        if fast is None:
            continue
        assert fast.VR == elem.VR, tag
        assert leak._text_of(fast.value) == leak._text_of(elem.value), (tag, elem.VR)
        assert [str(v) for v in leak._values(fast.value)] == [
            str(v) for v in leak._values(elem.value)
        ], (tag, elem.VR)
        compared += 1
    return compared


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192", None])
def test_decoded_text_is_pydicoms_text(implicit: bool, charset: str | None) -> None:
    codec = "utf-8" if charset == "ISO_IR 192" else "latin-1"
    for keyword, vr, value in CASES:
        ds = Dataset()
        if charset:
            ds.SpecificCharacterSet = charset
        text = "\\".join(value) if isinstance(value, list) else str(value)
        data = text.encode(codec)
        data += b" " * (len(data) & 1)  # the bytes as a sender wrote them, even padded
        # the element as pydicom's reader leaves it (in implicit VR without a VR)
        raw = RawDataElement(
            Tag(keyword), None if implicit else vr, len(data), data, 0, implicit, True
        )
        ds[raw.tag] = raw  # type: ignore[assignment]
        assert _compare(ds) == 1, (keyword, value)


def test_decoded_text_in_iso_2022_japanese() -> None:
    raw = "山田病院".encode("iso2022_jp")  # escape sequences switch the character set
    buf_ds = Dataset()
    buf_ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    buf_ds.add(RawDataElement(0x00080080, "LO", len(raw), raw, 0, False, True))  # type: ignore[arg-type]
    read = _written(buf_ds, ExplicitVRLittleEndian)
    encodings = leak._encodings(read)
    fast = leak._decoded(read.get_item(0x00080080), encodings)  # type: ignore[arg-type]
    assert fast is not None
    assert fast.value == read.InstitutionName == "山田病院"


def test_nested_item_takes_its_parents_character_set() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    item = Dataset()
    item.InstitutionName = "Ærø Sygehus"
    ds.add_new("ReferencedStudySequence", "SQ", [item])
    read = _written(ds, ExplicitVRLittleEndian)
    nested = read.ReferencedStudySequence[0]
    fast = leak._decoded(nested.get_item(0x00080080), leak._encodings(nested))  # type: ignore[arg-type]
    assert fast is not None and fast.value == "Ærø Sygehus"


def test_left_to_pydicom() -> None:
    """PN, UN, numbers, sequences and implicit private elements are not decoded here."""
    ds = Dataset()
    ds.PatientName = "Doe^John"
    ds.Rows = 64
    ds.add_new(0x00091010, "LO", "private")
    ds.add_new(0x00090010, "LO", "CREATOR")
    read = _written(ds, ImplicitVRLittleEndian)
    for tag in (0x00100010, 0x00280010, 0x00091010):
        assert leak._decoded(read.get_item(tag), ["iso8859"]) is None  # type: ignore[arg-type]
