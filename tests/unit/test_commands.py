"""gateway.dicom.commands encodes a C-STORE-RSP exactly as pynetdicom does, and GuardedDIMSE
sends it in the P-DATA pynetdicom would send; a C-STORE-RQ sent from a file (a delivery, a
C-MOVE or C-GET sub-operation) goes out in the same P-DATA as pynetdicom's; other messages
take pynetdicom's path."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.uid import UID
from pynetdicom import _config, evt
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode

from gateway.dicom import commands, element_encoding
from gateway.dicom.guard import GuardedDIMSE
from gateway.dicom.reactor import _FileStoreDIMSE
from gateway.dicom.server import _any_uid_text

INSTANCES = (
    "1.2.3",
    "1.2.34",
    "1.2.840.113619.2.55.3.604688119.969.1268071029.320",
    "9" * 64,
    "1." + "2" * 90,  # over 64 characters: the node answers 0x0117 for it
)
STATUSES = (0x0000, 0x0111, 0x0117, 0xA700, 0xA900, 0xB000, 0xC000, 0x0001)


def _response(instance: str, status: int, message_id: int = 7, **extra: Any) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    rsp.AffectedSOPInstanceUID = instance
    rsp.Status = status
    for key, value in extra.items():
        setattr(rsp, key, value)
    return rsp


def _pynetdicom(primitive: C_STORE, max_pdu: int = 16384) -> tuple[bytes | None, list[Any]]:
    msg = C_STORE_RSP()
    msg.primitive_to_message(primitive)
    pdus = [p.presentation_data_value_list for p in msg.encode_msg(1, max_pdu)]
    return encode(msg.command_set, True, True), pdus


@pytest.fixture(autouse=True)
def _node_uid_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in the node (configure_pynetdicom): any UID text passes pynetdicom's check."""
    monkeypatch.setitem(_config.VALIDATORS, "UI", _any_uid_text)


@pytest.mark.parametrize("instance", INSTANCES)
def test_same_bytes_as_pynetdicom(instance: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for status in STATUSES:
            for message_id in (1, 7, 255, 65535):
                primitive = _response(instance, status, message_id)
                expected, _pdus = _pynetdicom(primitive)
                assert commands.store_response(primitive) == expected
                assert commands.store_response(primitive) == expected  # from the cache


def test_other_values_take_pynetdicoms_path() -> None:
    assert commands.store_response(_response("1.2.3", 0xC000, ErrorComment="x")) is None
    assert commands.store_response(_response("1.2.3", 0xA900, OffendingElement=[0x0010])) is None
    incomplete = C_STORE()
    incomplete.MessageIDBeingRespondedTo = 3
    incomplete.Status = 0
    assert commands.store_response(incomplete) is None


class _Assoc(SimpleNamespace):
    def get_handlers(self, event: Any) -> list[Any]:
        return self.handlers.get(event, [])


def _dimse(max_pdu: int, handlers: dict[Any, Any] | None = None) -> tuple[GuardedDIMSE, list[Any]]:
    sent: list[Any] = []
    assoc = _Assoc(
        is_requestor=False,
        requestor=SimpleNamespace(maximum_length=max_pdu),
        dul=SimpleNamespace(send_pdu=sent.append),
        handlers=handlers or {},
    )
    dimse = GuardedDIMSE(assoc)
    return dimse, sent


@pytest.mark.parametrize("max_pdu", [0, 4096, 16384, 262144, 100])
def test_sent_as_pynetdicom_sends_it(max_pdu: int) -> None:
    """One P-DATA, command fragment header 0x03, the same bytes; a PDU too small for it
    (fragments) goes through pynetdicom, which fragments it."""
    primitive = _response(INSTANCES[2], 0x0000)
    _expected, expected_pdus = _pynetdicom(primitive, max_pdu)
    dimse, sent = _dimse(max_pdu)
    dimse.send_msg(primitive, 1)
    assert [p.presentation_data_value_list for p in sent] == expected_pdus
    if max_pdu == 100:
        assert len(sent) > 1  # fragmented: pynetdicom's path


def test_a_listener_for_sent_messages_gets_pynetdicoms_message() -> None:
    """EVT_DIMSE_SENT hands its handlers pynetdicom's message object: built as before."""
    seen: list[Any] = []
    dimse, sent = _dimse(16384, {evt.EVT_DIMSE_SENT: [(seen.append, None)]})
    called: list[Any] = []
    original = C_STORE_RSP.primitive_to_message

    def spy(self: Any, primitive: Any) -> None:
        called.append(primitive)
        original(self, primitive)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C_STORE_RSP, "primitive_to_message", spy)
        mp.setattr(evt, "trigger", lambda *args: None)
        dimse.send_msg(_response("1.2.3", 0), 1)
    assert called and len(sent) == 1


def test_requests_and_other_messages_take_pynetdicoms_path() -> None:
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo = 1
    echo.AffectedSOPClassUID = UID("1.2.840.10008.1.1")
    echo.Status = 0
    dimse, sent = _dimse(16384)
    dimse.send_msg(echo, 1)
    msg = C_ECHO_RSP()
    msg.primitive_to_message(echo)
    assert [p.presentation_data_value_list for p in sent] == [
        p.presentation_data_value_list for p in msg.encode_msg(1, 16384)
    ]


def _request(instance: str, message_id: int, **extra: Any) -> C_STORE:
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    req.AffectedSOPInstanceUID = instance
    req.Priority = 2
    for key, value in extra.items():
        setattr(req, key, value)
    return req


def _pynetdicom_request(primitive: C_STORE, max_pdu: int) -> list[Any]:
    msg = C_STORE_RQ()
    msg.primitive_to_message(primitive)
    return [p.presentation_data_value_list for p in msg.encode_msg(1, max_pdu)]


MOVED = ({}, {"MoveOriginatorApplicationEntityTitle": "WORKSTATION", "MoveOriginatorMessageID": 9})


@pytest.mark.parametrize("instance", INSTANCES)
@pytest.mark.parametrize("moved", MOVED)
def test_request_same_bytes_as_pynetdicom(instance: str, moved: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for message_id in (1, 7, 255, 65535):
            for priority in (0, 1, 2):
                primitive = _request(instance, message_id, Priority=priority, **moved)
                primitive._dataset_path = (Path("x.dcm"), 0)
                msg = C_STORE_RQ()
                msg.primitive_to_message(primitive)
                expected = encode(msg.command_set, True, True)
                assert commands.store_request(primitive) == expected
                assert commands.store_request(primitive) == expected  # from the cache


@pytest.mark.parametrize("size", [0, 1, 16378, 16379, 50_000])
@pytest.mark.parametrize("max_pdu", [0, 16384, 262144])
@pytest.mark.parametrize("moved", MOVED)
def test_file_request_sent_as_pynetdicom_sends_it(
    tmp_path: Path, size: int, max_pdu: int, moved: dict[str, Any]
) -> None:
    """The command set in one P-DATA, then the data set read from the file past its offset,
    in fragments of the peer's maximum PDU, flagged 0x00 and the last 0x02: the P-DATA
    pynetdicom's encode_msg yields, for sizes on and around a fragment's boundary."""
    offset = 132 + 60  # preamble and some file meta, which are not sent
    path = tmp_path / "instance.dcm"
    path.write_bytes(bytes(range(256)) * ((offset + size) // 256 + 1))
    path.write_bytes(path.read_bytes()[: offset + size])
    primitive = _request(INSTANCES[2], 3, **moved)
    primitive._dataset_path = (path, offset)
    expected = _pynetdicom_request(primitive, max_pdu)
    sent: list[Any] = []
    assoc = _Assoc(
        is_requestor=True,
        acceptor=SimpleNamespace(maximum_length=max_pdu),
        dul=SimpleNamespace(send_pdu=sent.append),
        handlers={},
    )
    dimse = _FileStoreDIMSE(assoc)
    dimse.send_msg(primitive, 1)
    assert [p.presentation_data_value_list for p in sent] == expected
    assert len(sent) >= 2


def test_a_request_without_a_file_takes_pynetdicoms_path() -> None:
    """A C-STORE-RQ of an in-memory data set (no ``_dataset_path``) is not ours to send."""
    primitive = _request("1.2.3", 1)
    assert not commands.send_file_store(SimpleNamespace(), primitive, 1)
    response = _response("1.2.3", 0)
    response._dataset_path = (Path("x.dcm"), 0)
    assert not commands.send_file_store(SimpleNamespace(), response, 1)


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("AffectedSOPInstanceUID", "1.2.3"),
        ("AffectedSOPInstanceUID", "1." + "2" * 90),
        ("AffectedSOPInstanceUID", "not a uid"),
        ("MediaStorageSOPInstanceUID", UID("1.2.34")),
        ("MessageIDBeingRespondedTo", 65535),
        ("Status", 0xA700),
        ("MoveOriginatorApplicationEntityTitle", "SCU"),
        ("ErrorComment", "odd"),
        ("FileMetaInformationVersion", b"\x00\x01"),
        ("Status", -1),  # out of range for US: refused by both
    ],
)
@pytest.mark.parametrize("implicit_vr", [True, False])
def test_one_element_as_pydicom_writes_it_in_a_data_set(
    keyword: str, value: Any, implicit_vr: bool
) -> None:
    def outcome(encode: Any, *args: Any) -> bytes | str:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom warns of invalid values in both
                return bytes(encode(*args, implicit_vr=implicit_vr))
        except Exception as exc:  # the refusal is compared
            return type(exc).__name__

    expected = outcome(element_encoding.encode_elements, {keyword: value})
    assert outcome(element_encoding.encode_element, keyword, value) == expected
    if keyword == "Status" and value == -1:
        assert isinstance(expected, str)  # the refusal is pydicom's, on both paths
