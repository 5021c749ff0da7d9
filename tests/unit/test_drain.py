"""FAULTS F18: a C-STORE drained for want of memory has its PDUs read without being held.

Its data is read through a buffer made at import and dropped; only each item's presentation
context ID and message control header are kept (PS3.8 9.3.5.1, E.2), on a real TCP
connection, with PDUs made by pynetdicom's own encoder. The framing stays intact for the
PDU after; items that do not add up to the PDU are an invalid PDU (A-ABORT).
"""

from __future__ import annotations

import queue
import socket
import tracemalloc
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from gateway.dicom.guard import GuardedSocket
from gateway.dicom.reactor import drained_pdata, pdv_controls_of
from tests.support.pdus import pdata_tf as pdata

LAST_DATA = 0x02  # message control header: data, last fragment
MORE_DATA = 0x00  # data, not the last


def test_the_items_control_headers_are_read_from_a_body() -> None:
    body = pdata((1, MORE_DATA, b"a" * 100), (3, LAST_DATA, b"b" * 7))[6:]
    assert pdv_controls_of(body) == [(1, MORE_DATA), (3, LAST_DATA)]


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no item
        b"\x00\x00\x00\x06\x01\x02abc",  # an item longer than the body
        b"\x00\x00\x00\x01\x01",  # an item too short for its context ID and header
        b"\x00\x00\x00\x02\x01\x02\x00\x00",  # a second item header cut short
    ],
)
def test_items_that_do_not_add_up_are_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        pdv_controls_of(body)


def test_the_drained_pdu_carries_only_the_control_headers() -> None:
    primitive = drained_pdata([(1, MORE_DATA), (1, LAST_DATA)]).to_primitive()
    assert primitive.presentation_data_value_list == [(1, b"\x00"), (1, b"\x02")]


@pytest.fixture
def connection() -> Iterator[tuple[GuardedSocket, socket.socket, list[str]]]:
    """A guarded socket on the accepting end of a real TCP connection, and the peer's end."""
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    listener.close()
    violations: list[str] = []
    assoc = SimpleNamespace(dul=SimpleNamespace(event_queue=queue.Queue()))
    guarded = GuardedSocket(
        assoc,
        accepted,
        max_pdu_size=1 << 20,
        max_associate_pdu_size=1 << 20,
        pdu_read_timeout=5.0,
        on_violation=violations.append,
    )
    yield guarded, peer, violations
    peer.close()
    accepted.close()


def test_a_large_pdu_is_skipped_without_being_held(
    connection: tuple[GuardedSocket, socket.socket, list[str]],
) -> None:
    guarded, peer, violations = connection
    big = pdata((5, MORE_DATA, bytes(400_000)), (5, LAST_DATA, bytes(300_000)))
    after = pdata((7, LAST_DATA, b"next"))
    peer.sendall(big + after)
    header = guarded.recv(6)
    tracemalloc.start()
    try:
        controls = guarded.skip_pdata(int.from_bytes(header[2:6], "big"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert controls == [(5, MORE_DATA), (5, LAST_DATA)]
    assert peak < 16 * 1024, f"{peak} bytes allocated to skip a {len(big)}-byte PDU"
    # the next PDU is read whole and in step
    assert bytes(guarded.recv(6)) == after[:6]
    assert bytes(guarded.recv(len(after) - 6)) == after[6:]
    assert not violations


def test_items_that_overrun_the_pdu_abort_the_association(
    connection: tuple[GuardedSocket, socket.socket, list[str]],
) -> None:
    guarded, peer, violations = connection
    # a PDU of 12 bytes whose one item claims 100
    peer.sendall(b"\x04\x00\x00\x00\x00\x0c" + b"\x00\x00\x00\x64\x01\x02" + bytes(6))
    header = guarded.recv(6)
    with pytest.raises(OSError):
        guarded.skip_pdata(int.from_bytes(header[2:6], "big"))
    assert violations == ["invalid-pdata"]
    peer.settimeout(5)
    assert peer.recv(10)[:1] == b"\x07", "no A-ABORT reached the peer"


def test_a_peer_that_closes_midway_is_a_closed_transport(
    connection: tuple[GuardedSocket, socket.socket, list[str]],
) -> None:
    guarded, peer, violations = connection
    whole = pdata((1, LAST_DATA, bytes(50_000)))
    peer.sendall(whole[:20_000])
    peer.shutdown(socket.SHUT_WR)
    header = guarded.recv(6)
    with pytest.raises(OSError):
        guarded.skip_pdata(int.from_bytes(header[2:6], "big"))
    assert not violations
