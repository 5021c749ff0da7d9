"""Real ultrasound files (deid-data, pydicom-data): burned-in text is gone, the rest is intact.

Tokens below were read off the images (rendered to PNG and looked at); each test first shows
that OCR reads them on the original, so their absence after cleaning means something.
"""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path

import deid_data
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from gateway.deid import ProjectKey, deidentify_bytes, pixels
from gateway.deid import ocr as ocr_mod
from gateway.deid.ocr import OcrEngine
from gateway.deid.profiles import Profile
from tests.pixels.conftest import profile_with

US = Path(os.path.dirname(deid_data.__file__)) / "data" / "ultrasounds"

# file, tokens burned in (identifying), lossless input
CASES = [
    # Philips EPIQ 5G: "ZZZ TEST PATIENT... 00079241539 DOB: 08/29/1951 M CCHS CLEVELAN..."
    (US / "GREYSCALE_IMAGE.dcm", ["00079241539", "08/29/1951"], True),
    # Siemens S2000: "ZZZDOWNTIME,MARY  AC  8:48:26 AM 4/14/2020  120907058 / 00047431395 CCHS
    # CLEVELAND CLINIC"
    (US / "RGB_IMAGE.dcm", ["4/14/2020", "120907058", "00047431395", "CLEVELAND"], True),
    # GE LOGIQ 700: "BAPTIST MED CTR  +2:09:04  630P630 78F78 44CG43 IM#2"
    (Path(get_testdata_file("US1_UNCR.dcm")), ["BAPTIST"], True),
    # Philips CX50: "PHILIPS OB  11-05-25-142825  Philips Healthcare  5/25/2011 2:56:22 PM"
    (Path(get_testdata_file("OBXXXX1A.dcm")), ["5/25/2011", "11-05-25-142825"], True),
    # ALOKA SSD-4000: "*WESTWAY MEDICAL* ULTRASOUND  24-MAY-02  11:24:20" (OCR reads it poorly)
    (Path(get_testdata_file("gdcm-US-ALOKA-16.dcm")), [], True),
]


def _words(engine: OcrEngine, ds: pydicom.Dataset) -> list[str]:
    g = pixels.check_geometry(ds, max_pixel_bytes=1 << 30)
    arr, photometric = pixels.decode(ds, g)
    palette = ds if photometric == "PALETTE COLOR" else None
    found = ocr_mod.find_text(
        engine, arr[0], photometric, scale=2, min_confidence=50, palette=palette
    )
    return [w.text for w in found]


@pytest.mark.parametrize(
    ("path", "tokens", "lossless"), CASES, ids=lambda c: getattr(c, "name", "")
)
def test_burned_in_text_is_gone_and_the_rest_is_unchanged(
    path: Path,
    tokens: list[str],
    lossless: bool,
    profile: Profile,
    key: ProjectKey,
    engine: OcrEngine,
) -> None:
    original = pydicom.dcmread(path)
    before = " ".join(_words(engine, original))
    for t in tokens:
        assert t in before, f"OCR does not read {t!r} on the original; the test would prove nothing"

    data, _, report = deidentify_bytes(path.read_bytes(), profile, key, ocr=engine)
    out = pydicom.dcmread(BytesIO(data))
    after = " ".join(_words(engine, out))
    for t in tokens:
        assert t not in after
    assert report.pixels is not None and report.pixels["cleaned"] and report.pixels["ocr_passed"]
    assert out.BurnedInAnnotation == "NO"
    codes = [str(i.CodeValue) for i in out.DeidentificationMethodCodeSequence]
    assert "113101" in codes and "113100" in codes
    assert out.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian

    # the output decodes, and outside the rule's regions every pixel is the original's
    rule = profile.pixels.rules.first_match(original)  # type: ignore[union-attr]
    assert rule is not None and report.pixels["rule"] == rule.name
    g = pixels.check_geometry(original, max_pixel_bytes=1 << 30)
    want, _ = pixels.decode(original, g)
    got = out.pixel_array.reshape(want.shape)
    boxes, blank_mask = pixels.rule_regions(rule, original, g.rows, g.columns)
    touched = np.zeros((g.rows, g.columns), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        touched[y0:y1, x0:x1] = True
    if blank_mask is not None:
        touched |= blank_mask
    assert touched.any()
    if lossless:
        assert np.array_equal(got[:, ~touched], want[:, ~touched])
    assert not np.array_equal(got[:, touched], want[:, touched])


def test_multiframe_ultrasound_is_cleaned_on_every_frame(
    tmp_path: Path, key: ProjectKey, engine: OcrEngine
) -> None:
    path = US / "ultrasound-multiframe.dcm"
    sampled = profile_with(tmp_path, ocr_all_frames_up_to="1", ocr_sample="2")
    data, _, report = deidentify_bytes(path.read_bytes(), sampled, key, ocr=engine)
    out = pydicom.dcmread(BytesIO(data))
    assert report.pixels is not None and report.pixels["frames"] == 30
    assert report.pixels["ocr_frames"] == [0, 1, 28, 29] and report.pixels["ocr_passed"]
    arr = out.pixel_array
    assert arr.shape == (30, 600, 800, 3)
    assert not arr[:, :28].any()  # the header band is black on every frame
    original = pydicom.dcmread(path).pixel_array
    assert np.array_equal(arr[:, 28:], original[:, 28:])
