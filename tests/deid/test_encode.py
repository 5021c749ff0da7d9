"""``gateway.deid.files.encode`` writes the engine's output byte for byte as
``save_as(enforce_file_format=True)`` does, on every DICOM file shipped by pydicom, pydicom-data
and deid-data (explicit and implicit VR, big endian, deflated, encapsulated pixel data)."""

from __future__ import annotations

import copy
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from gateway.deid import deidentify
from gateway.deid.files import encode
from tests.deid.test_real_files import _files


def _save_as(ds) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_encode_is_save_as_on_every_shipped_file(key, basic) -> None:
    compared = 0
    syntaxes = set()
    for f in _files():
        try:
            original = dcmread(f, force=True)
            out, _report = deidentify(original, basic, key)
        except Exception:
            continue  # not DICOM, or quarantined (test_real_files checks why)
        twin = copy.deepcopy(out)
        try:
            expected = _save_as(twin)
        except Exception as exc:
            with pytest.raises(type(exc)):
                encode(out)
            continue
        assert encode(out) == expected, f.name
        compared += 1
        syntaxes.add(str(out.file_meta.TransferSyntaxUID))
    assert compared > 200
    for ts in (ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        assert ts in syntaxes  # the fast path and the fallback are both exercised
    assert any(u.startswith("1.2.840.10008.1.2.4.") for u in syntaxes)  # encapsulated


def test_encode_refuses_what_save_as_refuses(key, basic) -> None:
    from tests.deid.conftest import base_dataset

    ds = base_dataset()
    out, _ = deidentify(ds, basic, key)
    out._dict[DataElement(0x00020010, "UI", "1.2").tag] = DataElement(0x00020010, "UI", "1.2")
    with pytest.raises(ValueError, match="File Meta Information Group"):
        encode(out)


def test_report_names_the_outputs_transfer_syntax(key, basic) -> None:
    """The delivery worker sends the output as report.transfer_syntax_uid (not re-read)."""
    from pydicom.data import get_testdata_file

    from gateway.deid import deidentify_bytes

    for name in ("CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm"):
        data, _uid, report = deidentify_bytes(
            open(get_testdata_file(name), "rb").read(), basic, key
        )
        assert report.transfer_syntax_uid == dcmread(BytesIO(data)).file_meta.TransferSyntaxUID
        assert report.to_dict()["transfer_syntax_uid"] == report.transfer_syntax_uid
