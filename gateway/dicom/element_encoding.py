"""pydicom's encoding of a few elements at a time, for messages built from cached parts.

A data set's Little Endian encoding is the concatenation, in tag order, of its elements'
encodings (each written on its own), so a message whose elements mostly repeat can be put
together from parts encoded once: the File Meta of received files (:mod:`file_meta`) and
the C-STORE response's command set (:mod:`commands`). Every part is still pydicom's.
"""

from __future__ import annotations

from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset


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


def encode_element(keyword: str, value: Any, *, implicit_vr: bool) -> bytes:
    """What :func:`encode_elements` gives for ``{keyword: value}`` alone, without a data set
    around it: pydicom's ``DataElement`` (which validates the value as ``Dataset`` does) and
    ``write_data_element``, as ``write_dataset`` calls it for each element. The values that
    change with every instance (a SOP Instance UID) take this path: building and writing a
    one-element data set cost ~110 us, this ~40."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"unknown keyword {keyword!r}")
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = implicit_vr
    write_data_element(buffer, DataElement(tag, dictionary_VR(tag), value))
    return buffer.getvalue()
