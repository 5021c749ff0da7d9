"""pydicom's encoding of a few elements at a time, for messages built from cached parts.

A data set's Little Endian encoding is the concatenation, in tag order, of its elements'
encodings (each written on its own), so a message whose elements mostly repeat can be put
together from parts encoded once: the File Meta of received files (:mod:`file_meta`) and
the C-STORE response's command set (:mod:`commands`). Every part is still pydicom's.
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset


def encode_elements(elements: dict[str, Any], *, implicit_vr: bool, meta: bool = False) -> bytes:
    """pydicom's Little Endian encoding of a data set holding ``elements`` (keyword: value;
    a ``FileMetaDataset`` when ``meta``); raises what pydicom raises."""
    ds = FileMetaDataset() if meta else Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = implicit_vr
    write_dataset(buffer, ds)
    return buffer.getvalue()
