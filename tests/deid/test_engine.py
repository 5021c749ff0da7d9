"""Each action code, option and the VR sweep, by explicit assertion and by golden DICOM JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from gateway.deid import IMPLEMENTATION_CLASS_UID, deidentify, leak_check, load_profile
from gateway.errors import DeidError

from .conftest import base_dataset

GOLDEN = Path(__file__).parent / "golden"
ITEMS = Path(__file__).parent / "profiles" / "items.toml"


def rich_dataset() -> Dataset:
    ds = base_dataset()
    ds.InstanceCreationDate = "20240131"  # X/D -> X
    ds.ContentDate = "20240131"  # Z/D -> D (documented)
    ds.AcquisitionDate = "20240131"  # X/Z -> X
    ds.AcquisitionDateTime = "20240131101501.5+0100"  # X/Z/D -> D
    ds.DeviceSerialNumber = "SN-4455"  # X/Z/D -> D, K with device identity
    ds.PatientWeight = "81"  # X, K with patient characteristics
    ds.ImageComments = "Quixote tilted at 2 windmills on 2024-01-31, MRN7781234"  # X / C
    ds.ConvolutionKernel = "B30f"  # unlisted SH: swept unless named
    ds.add_new(0x00181030, "LO", "Thorax std")  # ProtocolName X/D -> X, C
    ds.add_new(0x00191001, "LO", "unlisted private")  # no creator: removed
    ds.add_new(0x00210010, "LO", "Philips PET Private Group")
    ds.add_new(0x00211000, "DS", "1.5")
    ds.add_new(0x70530010, "LO", "Philips PET Private Group")  # safe list: (7053,xx00) SUV
    ds.add_new(0x70531000, "DS", "0.0012")
    ds.add_new(0x70531001, "LO", "Not on the safe list")
    ds.add_new(0x00090010, "LO", "ACME 1.1")
    ds.add_new(0x00091010, "LO", "acme kept by item")
    ds.add_new(0x00091020, "LO", "acme kept by mask")
    ds.add_new(0x00091030, "LO", "acme removed")
    ds.add_new(0x00331000, "LT", "hidden note")  # unlisted public LT: swept
    ds.add_new(0x60004000, "LT", "overlay comment")
    ds.add_new(0x60000010, "US", 2)
    ds.add_new(0x50002000, "US", 3)  # curve data group: removed
    ds.add_new(0x00100012, "PN", "Alonso")  # Name to Use (new), X
    ds.add_new(0x00142006, "PN", "Quijana^Alonso")  # Evaluator Name: unlisted PN -> swept
    ds.ReferencedImageSequence = Sequence([Dataset()])
    ds.ReferencedImageSequence[0].ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.2.1125.1.555"
    ds.IconImageSequence = Sequence([Dataset()])
    ds.IconImageSequence[0].Rows = 1
    code = Dataset()
    code.CodeValue = "T-D3000"
    code.CodingSchemeDesignator = "SRT"
    code.CodeMeaning = "Chest"
    ds.AnatomicRegionSequence = Sequence([code])
    return ds


def _golden(name: str, before: Dataset, after: Dataset, actions: list[dict[str, str]]) -> None:
    doc = {
        "before": before.to_json_dict(),
        "after": after.to_json_dict(),
        "after_meta": after.file_meta.to_json_dict(),
        "actions": actions,
    }
    path = GOLDEN / f"{name}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1" or not path.exists():
        path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    assert json.loads(path.read_text()) == json.loads(json.dumps(doc, sort_keys=True))


@pytest.mark.parametrize("name", ["basic", "research", "items"])
def test_golden(name: str, key, basic, research) -> None:
    profile = {"basic": basic, "research": research, "items": load_profile(ITEMS)}[name]
    before = rich_dataset()
    after, report = deidentify(before, profile, key)
    _golden(name, before, after, report.to_dict()["actions"])


def test_basic_actions(key, basic) -> None:
    ds = rich_dataset()
    out, report = deidentify(ds, basic, key)
    # the input is untouched
    assert ds.PatientName == "Quixote^Alonso^Q"
    # U: every instance UID, references included, becomes 2.25.<int>
    for uid in (
        out.SOPInstanceUID,
        out.StudyInstanceUID,
        out.SeriesInstanceUID,
        out.FrameOfReferenceUID,
        out.ReferencedImageSequence[0].ReferencedSOPInstanceUID,
    ):
        assert uid.startswith("2.25.") and len(uid) <= 64
    assert out.ReferencedImageSequence[0].ReferencedSOPClassUID == ds.SOPClassUID  # well-known
    # Z
    assert out.StudyDate == "" and out.AccessionNumber == "" and out.StudyID == ""
    assert out.PatientBirthDate == ""
    # pseudonyms (Z/D and Z, filled with keyed pseudonyms)
    assert out.PatientID.startswith("PID-") and len(out.PatientID) == 16
    assert str(out.PatientName).startswith("ANON^")
    # compound choices
    assert "InstanceCreationDate" not in out  # X/D -> X
    assert out.ContentDate == "19000101"  # Z/D -> D
    assert "AcquisitionDate" not in out  # X/Z -> X
    assert out.AcquisitionDateTime == "19000101000000"  # X/Z/D -> D (Type 1C enhanced)
    assert out.DeviceSerialNumber == "ANONYMIZED"  # X/Z/D -> D
    assert "ReferencedImageSequence" in out  # X/Z/U* -> U*
    # X
    for kw in (
        "InstitutionName",
        "StationName",
        "PatientWeight",
        "ImageComments",
        "ProtocolName",
        "IconImageSequence",
        "PatientAge",
        "StudyDescription",
    ):
        assert kw not in out, kw
    assert 0x00100012 not in out  # Name to Use, by tag from the table
    # K
    assert out.PatientSex == ""  # Z in the basic profile
    assert out.Modality == "CT" and out.Rows == 2
    # sweep
    assert 0x00142006 in out and out[0x00142006].value == "ANONYMIZED"  # unlisted PN
    assert 0x00331000 not in out  # unlisted LT
    assert out.ConvolutionKernel == "B30f"  # unlisted, kept by naming it in basic.toml
    assert out.AnatomicRegionSequence[0].CodeMeaning == "Chest"
    # private, curves, overlays
    assert not any(e.tag.is_private for e in out)
    assert 0x50002000 not in out and 0x60004000 not in out and 0x60000010 in out
    # markers and meta
    assert out.PatientIdentityRemoved == "YES"
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == ["113100"]
    assert f"key {key.key_id}" in out.DeidentificationMethod
    assert out.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in out.file_meta
    assert report.method_codes == ["113100"]
    assert leak_check(ds, out) == []


def test_research_options(key, research) -> None:
    ds = rich_dataset()
    out, report = deidentify(ds, research, key)
    shift = key.date_shift_days(ds.PatientID, -3650, -365)
    from datetime import date, timedelta

    expected = (date(2024, 1, 31) + timedelta(days=shift)).strftime("%Y%m%d")
    assert out.StudyDate == expected and out.ContentDate == expected
    assert out.AcquisitionDateTime == expected + "101501.5+0100"  # time of day kept
    assert out.StudyTime == "101500"
    assert out.PatientAge == "077Y" and out.PatientWeight == "81"  # patient characteristics
    assert out.StationName == "CTROOM17" and out.DeviceSerialNumber == "SN-4455"  # device
    assert out[0x70531000].value == 0.0012 and 0x70531001 not in out  # safe private
    assert out[0x70530010].value == "Philips PET Private Group"
    assert 0x00211000 not in out  # safe element byte, but another group
    assert "Quixote" not in out.ImageComments and "MRN7781234" not in out.ImageComments
    assert "windmills" in out.ImageComments  # clean descriptors keeps the rest
    assert out.SeriesDescription == "Lung kernel"
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = {c.CodeValue for c in out.DeidentificationMethodCodeSequence}
    assert {"113100", "113107", "113108", "113109", "113111", "113105"} <= codes
    assert "113104" not in codes  # no structured content in this instance: not claimed
    assert leak_check(ds, out, profile=research) == []
    assert "retain_longitudinal_modified_dates" in report.options_acted


def test_items_profile(key) -> None:
    profile = load_profile(ITEMS)
    ds = rich_dataset()
    out, _ = deidentify(ds, profile, key)
    assert out.SeriesDescription == "Lung kernel"  # condition Modality CT matched
    ds.Modality = "US"
    assert "SeriesDescription" not in deidentify(ds, profile, key)[0]
    assert out.InstitutionName == "SITE-A"
    assert out[0x60004000].value == ""
    assert out[0x00091010].value == "acme kept by item"
    assert out[0x00091020].value == "acme kept by mask"
    assert 0x00091030 not in out and out[0x00090010].value == "ACME 1.1"
    assert out.ReferringPhysicianName == "NOBODY" and out[0x00142006].value == "NOBODY"
    assert str(out.PatientName).startswith("NOBODY")  # items come before the table


def test_sequences_zeroed_and_removed(key, basic) -> None:
    ds = base_dataset()
    ds.OtherPatientIDsSequence = Sequence([Dataset()])
    ds.OtherPatientIDsSequence[0].PatientID = "OTHER123"
    ds.ReferencedStudySequence = Sequence([Dataset()])
    out, _ = deidentify(ds, basic, key)
    assert "OtherPatientIDsSequence" not in out
    assert "ReferencedStudySequence" not in out  # X/Z -> X


def test_fail_closed_reason_has_no_value(key, basic) -> None:
    ds = base_dataset()
    del ds.SOPClassUID
    with pytest.raises(DeidError) as exc:
        deidentify(ds, basic, key)
    assert "Quixote" not in str(exc.value)
    profile = load_profile(ITEMS)
    ds = base_dataset()
    ds.add_new(0x00091010, "LO", "x")
    ds.add_new(0x00090010, "LO", "ACME 1.1")
    bad = ds.copy()
    bad.ReferencedImageSequence = Sequence([Dataset()])
    bad.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "Quixote"  # odd but mapped
    out, _ = deidentify(bad, profile, key)
    assert "Quixote" not in str(out.to_json_dict())
