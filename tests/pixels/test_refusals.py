"""Fail closed: unknown at-risk devices, bad geometry, undecodable syntaxes, documents, and text
the rules missed (one middle frame of a cine) are refused with a reason free of patient data."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

from gateway.deid import ProjectKey, deidentify_bytes
from gateway.deid.ocr import OcrEngine
from gateway.deid.profiles import Profile
from gateway.errors import DeidError
from tests.pixels.conftest import profile_with

NAME = "KOWALCZYK^AGNIESZKA"


def _encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def cine(frames: int, *, text_on: int | None, lines: tuple[str, ...] = ()) -> bytes:
    """A Philips EPIQ-like 8-bit cine; ``lines`` drawn in the image area of frame ``text_on``."""
    rng = np.random.default_rng(5)
    arr = rng.integers(0, 40, size=(frames, 480, 640), dtype=np.uint8)
    if text_on is not None:
        img = Image.fromarray(arr[text_on])
        draw = ImageDraw.Draw(img)
        font = ImageFont.load_default(size=26)
        for i, line in enumerate(lines):
            draw.text((160, 200 + 40 * i), line, fill=230, font=font)
        arr[text_on] = np.asarray(img)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "US"
    ds.Manufacturer = "Philips Medical Systems"
    ds.ManufacturerModelName = "EPIQ 7C"
    ds.PatientName = NAME
    ds.PatientID = "MRN-4471902"
    ds.PatientBirthDate = "19750304"
    ds.Rows, ds.Columns = 480, 640
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = arr.tobytes()
    return _encode(ds)


def test_text_on_one_middle_frame_only_is_caught(
    profile: Profile, key: ProjectKey, engine: OcrEngine
) -> None:
    data = cine(5, text_on=2, lines=("KOWALCZYK AGNIESZKA", "DOB 03/04/1975"))
    with pytest.raises(DeidError) as err:
        deidentify_bytes(data, profile, key, ocr=engine)
    reason = str(err.value)
    assert "frame 2 box" in reason and "frame 1" not in reason and "frame 3" not in reason
    assert "KOWALCZYK" not in reason.upper() and "1975" not in reason


def test_clean_cine_passes_and_says_so(
    profile: Profile, key: ProjectKey, engine: OcrEngine
) -> None:
    data, _, report = deidentify_bytes(cine(5, text_on=None), profile, key, ocr=engine)
    out = pydicom.dcmread(BytesIO(data))
    assert report.pixels is not None and report.pixels["ocr_frames"] == list(range(5))
    assert out.BurnedInAnnotation == "NO"
    assert "113101" in report.method_codes


def test_at_risk_device_without_rule_is_refused_with_its_signature(
    profile: Profile, key: ProjectKey
) -> None:
    data = Path(get_testdata_file("color-pl.dcm")).read_bytes()  # US from "Acme Products"
    with pytest.raises(DeidError) as err:
        deidentify_bytes(data, profile, key)
    reason = str(err.value)
    assert "no pixel rule matches" in reason
    for fact in ("Manufacturer='Acme Products'", "Rows='120'", "Columns='256'", "1.2.840.10008"):
        assert fact in reason


def test_detect_mode_reports_the_boxes_of_an_unknown_device(
    tmp_path: Path, key: ProjectKey, engine: OcrEngine
) -> None:
    prof = profile_with(tmp_path, ocr='"detect"')
    raw = pydicom.dcmread(
        BytesIO(cine(1, text_on=0, lines=("KOWALCZYK AGNIESZKA", "DOB 03/04/1975")))
    )
    raw.Manufacturer = "Nobody Ultrasound"
    with pytest.raises(DeidError) as err:
        deidentify_bytes(_encode(raw), prof, key, ocr=engine)
    assert "text was found (frame 0 box" in str(err.value)
    assert "Manufacturer='Nobody Ultrasound'" in str(err.value)


def _us(**changes: object) -> bytes:
    ds = pydicom.dcmread(BytesIO(cine(2, text_on=None)))
    for k, v in changes.items():
        setattr(ds, k, v)
    return _encode(ds)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"PixelData": b"\0" * 1000}, "Pixel Data holds 1000 bytes"),
        ({"NumberOfFrames": 3}, "Pixel Data holds"),
        ({"BitsAllocated": 12}, "BitsAllocated 12"),
        ({"Rows": 0}, "out of range"),
        ({"PhotometricInterpretation": "RGB"}, "SamplesPerPixel 1"),
        ({"HighBit": 3}, "inconsistent"),
    ],
)
def test_bad_geometry_is_refused_before_decoding(
    changes: dict[str, object], reason: str, profile: Profile, key: ProjectKey
) -> None:
    with pytest.raises(DeidError, match=reason):
        deidentify_bytes(_us(**changes), profile, key)


def test_bounded_size(tmp_path: Path, key: ProjectKey) -> None:
    prof = profile_with(tmp_path, max_pixel_bytes="100000")
    with pytest.raises(DeidError, match="above the bound"):
        deidentify_bytes(_us(), prof, key)


def test_undecodable_syntaxes_are_refused(profile: Profile, key: ProjectKey) -> None:
    # a broken JPEG Extended stream (pydicom's own JPEG-lossy.dcm) on a device with a rule
    data = Path(get_testdata_file("JPEG-lossy.dcm")).read_bytes()
    with pytest.raises(DeidError, match="cannot be decoded"):
        deidentify_bytes(data, profile, key)
    ds = pydicom.dcmread(BytesIO(_us()))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder here
    ds.PixelData = pydicom.encaps.encapsulate([b"\0" * 64, b"\0" * 64])
    with pytest.raises(DeidError, match="cannot be decoded for cleaning"):
        deidentify_bytes(_encode(ds), profile, key)


def test_scanned_document_is_refused(profile: Profile, key: ProjectKey) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DOC"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4 fake\n"
    with pytest.raises(DeidError, match="document"):
        deidentify_bytes(_encode(ds), profile, key)


def test_basic_profile_without_pixels_is_unchanged(key: ProjectKey) -> None:
    from gateway.deid import load_profile

    data = Path(get_testdata_file("color-pl.dcm")).read_bytes()
    out, _, report = deidentify_bytes(data, load_profile("basic"), key)
    assert report.pixels is None
    assert pydicom.dcmread(BytesIO(out)).PixelData == pydicom.dcmread(BytesIO(data)).PixelData
