"""The C-STORE-RSP command set, encoded by pydicom from cached element encodings.

For every response pynetdicom builds a command set ``Dataset`` element by element (each
assignment validated), encodes it once to learn the group length and once more to send it:
~0.5 ms per received instance on the association's reactor thread, between the handler's
status and the response on the wire. Implicit VR Little Endian (PS3.7 6.3.1) encodes each
element on its own, so the command set is the concatenation, in tag order, of its elements'
encodings; :func:`store_response` takes each from pydicom
(:func:`gateway.dicom.element_encoding.encode_elements` of that element alone), keeps those
whose values repeat (the SOP Class, the command field, the data set type, the status, the
message ID) and encodes only the SOP Instance UID anew; the group length's value is the
length of the rest, as pynetdicom's ``_set_command_group_length`` computes it. The tests
compare it with pynetdicom's bytes.

Only a response with the four values the node's C-STORE handler gives (no Offending Element,
no Error Comment) takes this path; anything else is pynetdicom's.
"""

from __future__ import annotations

import functools
from typing import Any

from pynetdicom.dimse_primitives import C_STORE

from gateway.dicom.element_encoding import encode_elements

_OPTIONAL = ("OffendingElement", "ErrorComment")
C_STORE_RSP = 0x8001  # CommandField (PS3.7 E.1-1)
NO_DATA_SET = 0x0101  # CommandDataSetType: no data set follows


def _element(keyword: str, value: Any) -> bytes:
    """pydicom's Implicit VR Little Endian encoding of one command element."""
    return encode_elements({keyword: value}, implicit_vr=True)


_repeated = functools.lru_cache(maxsize=4096)(_element)


def store_response(primitive: C_STORE) -> bytes | None:
    """The encoded command set of C-STORE-RSP ``primitive``, or None when it is not a
    response of exactly SOP Class, Message ID Being Responded To, Status and SOP Instance
    (the caller then sends it as pynetdicom does)."""
    values = (
        primitive.AffectedSOPClassUID,
        primitive.MessageIDBeingRespondedTo,
        primitive.Status,
        primitive.AffectedSOPInstanceUID,
    )
    if any(v is None for v in values) or any(getattr(primitive, k) is not None for k in _OPTIONAL):
        return None
    sop_class, message_id, status, sop_instance = values
    try:
        rest = b"".join(
            (
                _repeated("AffectedSOPClassUID", sop_class),
                _repeated("CommandField", C_STORE_RSP),
                _repeated("MessageIDBeingRespondedTo", message_id),
                _repeated("CommandDataSetType", NO_DATA_SET),
                _repeated("Status", status),
                _element("AffectedSOPInstanceUID", sop_instance),
            )
        )
        return _repeated("CommandGroupLength", len(rest)) + rest
    except Exception:  # noqa: BLE001 - pydicom refused a value: pynetdicom's path answers
        return None
