"""gateway.dicom.file_meta writes exactly what pydicom's write_file_meta_info writes for
pynetdicom's create_file_meta, for any values, and refuses what pydicom refuses; a real
C-STORE's spool file begins with those bytes."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import dimse_messages
from pynetdicom.dsutils import create_file_meta

from gateway.crypto.keys import load_keyring
from gateway.dicom import file_meta
from gateway.spool.store import Spool
from tests.e2e.test_forward import storescu
from tests.support.datasets import make_instance
from tests.support.node import GatewayNode

CLASSES = (
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"),  # CT, explicit VR little endian
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2"),  # MR, implicit VR
    ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2.4.50"),  # SC, JPEG baseline
    ("1.2.840.10008.5.1.4.1.1.77.1.5.1", "1.2.840.10008.1.2.1.99"),  # odd length, deflated
)
INSTANCES = (
    "1.2.3",  # odd length: padded
    "1.2.34",  # even
    "1.2.840.113619.2.55.3.604688119.969.1268071029.320",
    "9" * 64,  # the longest valid UID
    "1." + "2" * 90,  # too long: written as received (the node answers 0x0117 itself)
    "not a uid",
    "1.2.3\x00",  # already padded
    "é.1",  # not ASCII
    "1.2\\3.4",  # a backslash (two values)
)


def _pydicom(sop_class: str, instance: str, ts: str) -> bytes | str:
    buffer = io.BytesIO()
    try:
        meta = create_file_meta(
            sop_class_uid=UID(sop_class), sop_instance_uid=UID(instance), transfer_syntax=UID(ts)
        )
        write_file_meta_info(buffer, meta)
    except Exception as exc:
        return type(exc).__name__
    return buffer.getvalue()


def _ours(sop_class: str, instance: str, ts: str) -> bytes | str:
    buffer = io.BytesIO()
    try:
        request = file_meta._create_file_meta(
            sop_class_uid=UID(sop_class), sop_instance_uid=UID(instance), transfer_syntax=UID(ts)
        )
        file_meta._write_file_meta(buffer, request)
    except Exception as exc:
        return type(exc).__name__
    return buffer.getvalue()


@pytest.mark.parametrize("instance", INSTANCES)
def test_same_bytes_or_same_refusal_as_pydicom(instance: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of invalid UIDs in both paths
        for sop_class, ts in CLASSES:
            expected = _pydicom(sop_class, instance, ts)
            assert _ours(sop_class, instance, ts) == expected, (sop_class, instance, ts)
            # the cached parts change nothing on a second instance of the same class
            assert _ours(sop_class, instance, ts) == expected


def test_values_pydicom_refuses_take_pydicoms_path() -> None:
    for empty in ("sop_class_uid", "sop_instance_uid", "transfer_syntax"):
        values = {
            "sop_class_uid": UID("1.2.840.10008.5.1.4.1.1.2"),
            "sop_instance_uid": UID("1.2.3"),
            "transfer_syntax": UID("1.2.840.10008.1.2.1"),
            empty: UID(""),
        }
        request = file_meta._create_file_meta(**values)
        assert isinstance(request, pydicom.dataset.FileMetaDataset)  # pydicom's own
        with pytest.raises(AttributeError, match="Required File Meta Information elements"):
            file_meta._write_file_meta(io.BytesIO(), request)
        with pytest.raises(AttributeError, match="Required File Meta Information elements"):
            write_file_meta_info(io.BytesIO(), create_file_meta(**values))


def test_installed_in_pynetdicoms_store_decoding(tmp_path: Path) -> None:
    """A C-STORE from DCMTK storescu: the spool file's plaintext begins with the zero
    preamble, DICM and pydicom's File Meta for the command's UIDs and the accepted
    transfer syntax."""
    src = make_instance(tmp_path / "in", seed=411)
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    node = GatewayNode(tmp_path / "node", worker={"enabled": False})
    with node:
        storescu(node, [src])
    spool = Spool(node.state_dir / "spool", keyring=load_keyring(node.state_dir))
    (key,) = list(spool.keys())
    with spool.open(key) as f:
        data = f.read()
    spooled = pydicom.dcmread(io.BytesIO(data))
    assert spooled.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert spooled.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    expected = _pydicom(
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(spooled.file_meta.TransferSyntaxUID)
    )
    assert isinstance(expected, bytes)
    assert data[:128] == bytes(128) and data[128:132] == b"DICM"
    assert data[132 : 132 + len(expected)] == expected


def test_install_replaces_pynetdicoms_two_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    # recorded by monkeypatch first, so they are pynetdicom's own again after the test
    monkeypatch.setattr(dimse_messages, "create_file_meta", dimse_messages.create_file_meta)
    monkeypatch.setattr(dimse_messages, "write_file_meta_info", write_file_meta_info)
    file_meta.install()
    assert dimse_messages.create_file_meta is file_meta._create_file_meta
    assert dimse_messages.write_file_meta_info is file_meta._write_file_meta
