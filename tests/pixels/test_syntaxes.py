"""Every compressed / photometric / depth variant with pixels in pydicom and pydicom-data is
cleaned and re-encoded losslessly with truthful attributes (OCR off here: see the OCR tests)."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from gateway.deid import ProjectKey, deidentify_bytes, pixels
from gateway.deid.ocr import OcrEngine
from tests.pixels.conftest import profile_with

CATCH_ALL = """
[[rule]]
name = "test-catch-all"
device = "test only: any instance no shipped rule matched"
match = { attribute = "SOPClassUID", present = true }
regions = [{ top = 10 }]
"""

VARIANTS = [
    "US1_J2KR.dcm",  # JPEG 2000 lossless, YBR_RCT
    "US1_J2KI.dcm",  # JPEG 2000 lossy, YBR_ICT
    "examples_jpeg2k.dcm",  # JPEG 2000 lossless
    "GDCMJ2K_TextGBR.dcm",  # JPEG 2000 lossless with text
    "SC_rgb_gdcm_KY.dcm",  # JPEG 2000
    "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG lossless SV1, Philips EPIQ 7C
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless, RGB
    "JPEG-LL.dcm",  # JPEG lossless, 16-bit NM screen
    "JPGExtended.dcm",  # JPEG extended
    "JPEG2000.dcm",  # JPEG 2000, 16-bit signed NM screen
    "examples_ybr_color.dcm",  # JPEG baseline YBR_FULL_422, 30 frames, SonoSite
    "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG baseline YBR_FULL_422
    "SC_rgb_dcmtk_+eb+cy+n1.dcm",  # JPEG baseline YBR_FULL
    "SC_rgb_jls_lossy_line.dcm",  # JPEG-LS near-lossless, RGB
    "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless, 16-bit
    "OBXXXX1A_rle.dcm",  # RLE, PALETTE COLOR
    "OBXXXX1A_rle_2frame.dcm",  # RLE, 2 frames
    "SC_rgb_rle_16bit_2frame.dcm",  # RLE, RGB 16-bit
    "SC_rgb_rle_32bit.dcm",  # RLE, RGB 32-bit
    "SC_ybr_full_422_uncompressed.dcm",  # native YBR_FULL_422
    "SC_ybr_full_uncompressed.dcm",  # native YBR_FULL
    "OBXXXX1A_expb_2frame.dcm",  # big endian PALETTE COLOR, 2 frames
    "gdcm-US-ALOKA-16_big.dcm",  # big endian 16-bit PALETTE COLOR
    "SC_rgb_expb_32bit_2frame.dcm",  # big endian RGB 32-bit
]


@pytest.fixture(scope="module")
def matrix_profile(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return profile_with(tmp_path_factory.mktemp("p"), CATCH_ALL, ocr='"off"')


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_cleaned_and_reencoded(name: str, matrix_profile, key: ProjectKey) -> None:  # type: ignore[no-untyped-def]
    path = Path(get_testdata_file(name))
    original = pydicom.dcmread(path)
    g = pixels.check_geometry(original, max_pixel_bytes=1 << 30)
    want, photometric = pixels.decode(original, g)
    data, _, report = deidentify_bytes(path.read_bytes(), matrix_profile, key, ocr=OcrEngine())
    out = pydicom.dcmread(BytesIO(data))
    assert report.pixels is not None and report.pixels["cleaned"]
    assert not report.pixels["ocr_passed"]  # no OCR check: no claim of ours
    assert out.get("BurnedInAnnotation") == original.get("BurnedInAnnotation")
    assert "113101" not in [str(i.CodeValue) for i in out.DeidentificationMethodCodeSequence]
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert report.transfer_syntax_uid == ExplicitVRLittleEndian  # what the worker sends as
    assert out.PhotometricInterpretation == photometric
    assert out.PhotometricInterpretation not in ("YBR_FULL_422", "YBR_RCT", "YBR_ICT")
    got, _ = pixels.decode(out, pixels.check_geometry(out, max_pixel_bytes=1 << 30))
    rule = matrix_profile.pixels.rules.first_match(original)
    boxes, mask = pixels.rule_regions(rule, original, g.rows, g.columns)
    touched = np.zeros((g.rows, g.columns), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        touched[y0:y1, x0:x1] = True
    if mask is not None:
        touched |= mask
    fill = pixels.fill_value(original, photometric, g)
    assert (got[:, touched] == fill).all()
    if g.lossless:
        assert np.array_equal(got[:, ~touched], want[:, ~touched])
        assert out.get("LossyImageCompression") == original.get("LossyImageCompression")
    else:
        assert out.LossyImageCompression == "01"


@pytest.mark.parametrize("name", ["US1_UNCR.dcm", "OBXXXX1A_rle_2frame.dcm"])
def test_rle_output(name: str, tmp_path: Path, key: ProjectKey) -> None:
    """RLE Lossless output (encode = "rle"); rows below every shipped band are untouched."""
    prof = profile_with(tmp_path, ocr='"off"', encode='"rle"')
    path = Path(get_testdata_file(name))
    data, _, report = deidentify_bytes(path.read_bytes(), prof, key)
    out = pydicom.dcmread(BytesIO(data))
    assert out.file_meta.TransferSyntaxUID == RLELossless
    assert report.transfer_syntax_uid == RLELossless
    want = pydicom.dcmread(path).pixel_array
    got = out.pixel_array.reshape(want.shape)
    rows = (
        (slice(None), slice(120, None))
        if want.ndim == 3 and want.shape[-1] != 3
        else (slice(120, None),)
    )
    assert np.array_equal(got[rows], want[rows])
