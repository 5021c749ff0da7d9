"""The C-STORE-RSP and C-STORE-RQ command sets, encoded by pydicom from cached element
encodings.

For every response pynetdicom builds a command set ``Dataset`` element by element (each
assignment validated), encodes it once to learn the group length and once more to send it:
~0.5 ms per received instance on the association's reactor thread, between the handler's
status and the response on the wire. Implicit VR Little Endian (PS3.7 6.3.1) encodes each
element on its own, so the command set is the concatenation, in tag order, of its elements'
encodings; :func:`store_response` takes each from pydicom
(:func:`gateway.dicom.element_encoding.encode_element`), keeps those
whose values repeat (the SOP Class, the command field, the data set type, the status, the
message ID) and encodes only the SOP Instance UID anew; the group length's value is the
length of the rest, as pynetdicom's ``_set_command_group_length`` computes it. The tests
compare it with pynetdicom's bytes.

Only a response with the four values the node's C-STORE handler gives (no Offending Element,
no Error Comment) takes this path; anything else is pynetdicom's.

The C-STORE-RQ of a data set sent from a file (``send_c_store`` of a path: deliveries and
C-MOVE/C-GET sub-operations) is built the same way by :func:`store_request` (the Message ID,
the Priority and the Move Originator repeat too; only the SOP Instance UID is encoded
anew), and :func:`send_file_store` sends it and the data set's fragments as pynetdicom's
``encode_msg`` would: in the delivery worker pynetdicom's building and encoding of each
request's command set was a tenth of its Python time.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from gateway.dicom.element_encoding import encode_element
from gateway.dicom.spool_io import open_plain

_OPTIONAL = ("OffendingElement", "ErrorComment")
C_STORE_RSP = 0x8001  # CommandField (PS3.7 E.1-1)
C_STORE_RQ = 0x0001
NO_DATA_SET = 0x0101  # CommandDataSetType: no data set follows
DATA_SET_FOLLOWS = 0x0001  # CommandDataSetType: pynetdicom's value when one follows


def _element(keyword: str, value: Any) -> bytes:
    """pydicom's Implicit VR Little Endian encoding of one command element."""
    return encode_element(keyword, value, implicit_vr=True)


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


def store_request(primitive: C_STORE) -> bytes | None:
    """The encoded command set of C-STORE-RQ ``primitive`` with a data set following, or
    None when it lacks SOP Class, Message ID, Priority or SOP Instance (the caller then
    sends it as pynetdicom does)."""
    values = (
        primitive.AffectedSOPClassUID,
        primitive.MessageID,
        primitive.Priority,
        primitive.AffectedSOPInstanceUID,
    )
    if any(v is None for v in values):
        return None
    sop_class, message_id, priority, sop_instance = values
    originator = primitive.MoveOriginatorApplicationEntityTitle
    originator_id = primitive.MoveOriginatorMessageID
    try:
        parts = [
            _repeated("AffectedSOPClassUID", sop_class),
            _repeated("CommandField", C_STORE_RQ),
            _repeated("MessageID", message_id),
            _repeated("Priority", priority),
            _repeated("CommandDataSetType", DATA_SET_FOLLOWS),
            _element("AffectedSOPInstanceUID", sop_instance),
        ]
        if originator is not None:
            parts.append(_repeated("MoveOriginatorApplicationEntityTitle", originator))
        if originator_id is not None:
            parts.append(_repeated("MoveOriginatorMessageID", originator_id))
        rest = b"".join(parts)
        return _repeated("CommandGroupLength", len(rest)) + rest
    except Exception:  # noqa: BLE001 - pydicom refused a value: pynetdicom's path sends it
        return None


def command_pdu(encoded: bytes | None, context_id: int, max_pdu: int) -> P_DATA | None:
    """A P-DATA carrying the encoded command set as its only (last) command fragment,
    control header xxxxxx11; None without one, or when it would not fit the peer's maximum
    PDU (``max_pdu``, 0 for unlimited) less the PDV item's 6 bytes of header."""
    if encoded is None or (max_pdu and len(encoded) > max_pdu - 6):
        return None
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))
    return pdata


def send_file_store(dimse: Any, primitive: Any, context_id: int) -> bool:
    """Send C-STORE-RQ ``primitive``, whose data set ``send_c_store`` left in a file
    (``primitive._dataset_path``: the path and the data set's offset in it), through
    ``dimse``'s DUL: the command set from :func:`store_request` in one P-DATA, then the
    data set read from the file (the spool's plaintext, :func:`open_plain`) in fragments of
    the peer's maximum PDU as pynetdicom's ``encode_msg`` reads and flags them.

    False when ``primitive`` is not such a request, its command set would not fit one PDU,
    or something listens for EVT_DIMSE_SENT (that event carries pynetdicom's message): the
    caller then sends it as pynetdicom does.
    """
    location = getattr(primitive, "_dataset_path", None)
    if (
        not isinstance(primitive, C_STORE)
        or primitive.MessageIDBeingRespondedTo is not None
        or not location
        or dimse.assoc.get_handlers(evt.EVT_DIMSE_SENT)
    ):
        return False
    limit = dimse.maximum_pdu_size
    command = command_pdu(store_request(primitive), context_id, limit)
    if command is None:
        return False
    path, offset = location
    # from this thread when that keeps the order (WakingDUL.send_pdata), else queued
    send = getattr(dimse.dul, "send_pdata", dimse.dul.send_pdu)
    with open_plain(Path(path)) as f:
        end = f.seek(0, 2)
        length = end - f.seek(offset)
        send(command)
        size = limit - 6 if limit else length
        sent = 0
        while True:  # data set fragments xxxxxx00, the last xxxxxx10
            chunk = f.read(size)
            sent += len(chunk)
            last = sent >= length or not chunk
            pdata = P_DATA()
            pdata.presentation_data_value_list.append(
                (context_id, (b"\x02" if last else b"\x00") + chunk)
            )
            send(pdata)
            if last:
                return True
