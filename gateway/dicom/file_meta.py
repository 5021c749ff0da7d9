"""The File Meta Information of every received data set, encoded by pydicom at a tenth of
the cost.

pynetdicom begins each C-STORE receive buffer (``STORE_RECV_CHUNKED_DATASET``) with a File
Meta Information group that ``dsutils.create_file_meta`` builds and pydicom's
``write_file_meta_info`` validates and writes: ~0.35 ms per instance on the thread that
reads the association's PDUs, before the data set's first byte is taken. Of its seven
elements only the Media Storage SOP Instance UID changes from one instance to the next, so
:func:`encoded` has pydicom write the elements before it (per SOP Class) and after it (per
Transfer Syntax) once, and per instance only that UID and the group length, whose value is
the length of what follows it, as ``write_file_meta_info`` computes it. Every byte is still
pydicom's encoding, in the order ``write_file_meta_info`` writes them; the tests compare the
two byte for byte.

:func:`install` puts it in pynetdicom's C-STORE decoding; anything else, and a value that
pydicom's validation would refuse (empty), still goes through pydicom's own functions.
"""

from __future__ import annotations

import functools
from typing import Any, BinaryIO, NamedTuple

from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    dimse_messages,
)
from pynetdicom.dsutils import create_file_meta

from gateway.dicom.element_encoding import encode_element, encode_elements


def _write(**elements: Any) -> bytes:
    """pydicom's Explicit VR Little Endian encoding of File Meta ``elements``, in order."""
    return encode_elements(elements, implicit_vr=False, meta=True)


@functools.lru_cache(maxsize=64)
def _head(sop_class_uid: str) -> bytes:
    return _write(
        FileMetaInformationVersion=b"\x00\x01", MediaStorageSOPClassUID=UID(sop_class_uid)
    )


@functools.lru_cache(maxsize=64)
def _tail(transfer_syntax: str) -> bytes:
    return _write(
        TransferSyntaxUID=UID(transfer_syntax),
        ImplementationClassUID=PYNETDICOM_IMPLEMENTATION_UID,
        ImplementationVersionName=PYNETDICOM_IMPLEMENTATION_VERSION,
    )


@functools.lru_cache(maxsize=256)
def _group_length(length: int) -> bytes:
    return _write(FileMetaInformationGroupLength=length)


def encoded(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """What ``write_file_meta_info(fp, create_file_meta(...))`` writes for these values
    (pynetdicom's implementation UID and version name), which must not be empty."""
    rest = (
        _head(sop_class_uid)
        + encode_element("MediaStorageSOPInstanceUID", UID(sop_instance_uid), implicit_vr=False)
        + _tail(transfer_syntax)
    )
    return _group_length(len(rest)) + rest


class _Request(NamedTuple):
    """What pynetdicom asked ``create_file_meta`` for, written by :func:`_write_file_meta`."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def _create_file_meta(**kwargs: Any) -> _Request | FileMetaDataset:
    values = [kwargs.get(k) for k in ("sop_class_uid", "sop_instance_uid", "transfer_syntax")]
    if set(kwargs) == set(_Request._fields) and all(isinstance(v, str) and v for v in values):
        return _Request(*(str(v) for v in values))
    return create_file_meta(**kwargs)  # pydicom's validation answers as it always did


def _write_file_meta(fp: BinaryIO, file_meta: Any, enforce_standard: bool = True) -> None:
    if isinstance(file_meta, _Request):
        fp.write(encoded(*file_meta))
        return
    write_file_meta_info(fp, file_meta, enforce_standard)  # type: ignore[arg-type]


def install() -> None:
    """pynetdicom's C-STORE receive buffers get their File Meta from :func:`encoded`."""
    dimse_messages.create_file_meta = _create_file_meta  # type: ignore[attr-defined,assignment]
    dimse_messages.write_file_meta_info = _write_file_meta  # type: ignore[attr-defined,assignment]
