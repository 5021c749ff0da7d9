"""Planted values: one distinct marker in each hiding place; none survives ``basic``."""

from __future__ import annotations

from io import BytesIO

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from gateway.deid import deidentify, deidentify_bytes, leak_check

from .conftest import base_dataset


def _item(**kw: object) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def planted() -> tuple[Dataset, dict[str, str]]:
    """Returns the dataset and {hiding place: marker}."""
    m: dict[str, str] = {}

    def mark(place: str) -> str:
        m[place] = f"ZQ{len(m):02d}MARKQ"
        return m[place]

    ds = base_dataset()
    ds.PatientName = f"{mark('patient name')}^{mark('patient given name')}"
    ds.PatientID = mark("patient id")
    ds.OtherPatientIDsSequence = Sequence([_item(PatientID=mark("other patient ids"))])
    ds.ReferencedPatientSequence = Sequence(
        [_item(ReferencedSOPInstanceUID="1.2.3.4.5.987654321", PatientName=mark("ref patient"))]
    )
    m["referenced patient uid"] = "1.2.3.4.5.987654321"
    ds.AccessionNumber = mark("accession")
    ds.StudyID = mark("study id")
    ds.InstitutionName = mark("institution")
    ds.InstitutionAddress = f"1 {mark('address')} Road"
    ds.PatientTelephoneNumbers = "555" + "0199" + "1234"
    m["phone"] = "55501991234"
    ds.StudyDescription = f"CT of {mark('study description word')}"
    ds.ImageComments = f"seen with {mark('image comments')}"
    ds.ReferringPhysicianName = mark("referring physician")
    ds.OperatorsName = mark("operator")
    ds.PatientMotherBirthName = mark("mother birth name")
    ds.PatientBirthDate = "19470315"
    m["birth date"] = "19470315"
    ds.add_new(0x00100012, "PN", mark("name to use (newer than pydicom)"))
    # three deep, SR content
    deep = _item(
        ValueType="TEXT",
        TextValue=mark("SR text three deep"),
        PersonName=mark("SR person name three deep"),
    )
    level2 = _item(ValueType="CONTAINER", ContentSequence=Sequence([deep]))
    level1 = _item(
        ValueType="CONTAINER",
        ContentSequence=Sequence([level2]),
        TextValue=mark("SR text"),
        DateTime="19991231120000",
    )
    m["SR datetime"] = "19991231"
    ds.ContentSequence = Sequence([level1])
    ds.RequestAttributesSequence = Sequence(
        [
            _item(
                RequestedProcedureID=mark("requested procedure id"),
                ScheduledProcedureStepID=mark("scheduled step id"),
            )
        ]
    )
    ds.PerformedProtocolCodeSequence = Sequence(
        [_item(CodeValue="X1", CodingSchemeDesignator="99X", CodeMeaning="protocol")]
    )
    ds.PerformedProtocolCodeSequence[0].add_new(0x00290010, "LO", "NESTED PRIV")
    ds.PerformedProtocolCodeSequence[0].add_new(0x00291001, "LO", mark("private in public seq"))
    # private LO, SQ, UN, date
    ds.add_new(0x00090010, "LO", "ACME 1.1")
    ds.add_new(0x00091001, "LO", mark("private LO"))
    ds.add_new(0x00091002, "SQ", Sequence([_item(PatientComments=mark("private SQ item"))]))
    ds.add_new(0x00091003, "UN", mark("private UN").encode() + b" ")
    ds.add_new(0x00091004, "DA", "19610704")
    m["private date"] = "19610704"
    # UN-encoded public elements: known to the dictionary, and unknown
    ds[0x00101040] = DataElement(0x00101040, "UN", mark("UN patient address").encode() + b" ")
    ds[0x00189999] = DataElement(0x00189999, "UN", mark("UN unknown public").encode() + b" ")
    ds.add_new(0x00209999, "LO", mark("unknown public LO"))
    # overlay and curve groups
    ds.add_new(0x60020022, "LO", mark("overlay description"))
    ds.add_new(0x60004000, "LT", mark("overlay comments"))
    ds.add_new(0x60003000, "OW", mark("overlay data").encode() + b"\x00")
    ds.add_new(0x50002500, "LO", mark("curve label"))
    ds.add_new(0x50003000, "OW", mark("curve data").encode() + b"\x00")
    # graphics and icon
    ds.GraphicAnnotationSequence = Sequence(
        [_item(TextObjectSequence=Sequence([_item(UnformattedTextValue=mark("graphic text"))]))]
    )
    ds.IconImageSequence = Sequence(
        [_item(Rows=1, Columns=8, BitsAllocated=8, PixelRepresentation=0)]
    )
    ds.IconImageSequence[0].add_new(0x7FE00010, "OB", mark("icon pixels").encode() + b"\x00")
    ds.add_new(0x00880200, "SQ", ds.IconImageSequence)
    ds.add_new(0xFFFCFFFC, "OB", mark("padding").encode() + b"\x00")
    # file meta
    ds.file_meta.SourceApplicationEntityTitle = mark("meta AE")
    ds.file_meta.PrivateInformationCreatorUID = "1.2.3.4.5.55555"
    ds.file_meta.PrivateInformation = mark("private meta").encode() + b"\x00"
    ds.file_meta.ImplementationVersionName = "ZQIMPLVER"
    m["implementation version"] = "ZQIMPLVER"
    for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
        m[f"uid {uid}"] = uid
    return ds, m


def _encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_markers_are_planted() -> None:
    ds, markers = planted()
    assert len(markers) > 40
    raw = _encode(ds)
    for place, marker in markers.items():
        assert marker.encode() in raw, place


def test_no_marker_survives_basic(key, basic) -> None:
    ds, markers = planted()
    data, _uid, report = deidentify_bytes(_encode(ds), basic, key)  # leak gate inside
    assert leak_check(ds, data) == []
    low = data.lower()
    for place, marker in markers.items():
        assert marker.encode().lower() not in low, place
    for form in (b"1947-03-15", b"15.03.1947", b"03/15/1947", b"1961", b"1999-12-31"):
        assert form not in data
    assert "Quixote" not in str(report.to_dict())


def test_the_gate_names_paths_not_values(key, basic) -> None:
    ds, markers = planted()
    out, _ = deidentify(ds, basic, key)
    out.add_new(0x00204000, "LT", f"note: {markers['accession']}")
    out.ContentSequence[0].ContentSequence[0].add_new(0x00204000, "LT", "Zq01markq")
    hits = leak_check(ds, out)
    assert hits == ["(0020,4000)", "(0040,A730)[0]/(0040,A730)[0]/(0020,4000)"]
    assert not any("ZQ" in h.upper() for h in hits)
