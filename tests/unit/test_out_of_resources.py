"""FAULTS F18: a connection the node has no thread or memory for is answered A-ASSOCIATE-RJ
transient (2/3/2, local limit exceeded) even when the log record or the metric that goes
with it cannot be allocated: the answer goes out first, from bytes made at import. It
answers the peer's A-ASSOCIATE-RQ: nothing is sent before that has arrived (or before
``REQUEST_WAIT`` has passed without one)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from gateway.dicom.server import DicomServer

REJECT_LOCAL_LIMIT = bytes([0x03, 0x00, 0, 0, 0, 4, 0x00, 0x02, 0x03, 0x02])


def _reject(
    on_security_event: Callable[[str], None],
    *,
    request_after: float = 0.0,
    request_wait: float | None = None,
    request: bytes = b"\x01\x00\x00\x00\x00\x44" + bytes(0x44),  # an A-ASSOCIATE-RQ's size
) -> tuple[bytes, list[BaseException]]:
    """Connect, let the node's ``_out_of_resources`` answer the accepted socket, send
    ``request`` after ``request_after`` s as a peer would, and read what comes back (an
    AssertionError if anything came before the request was sent)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    listener.close()
    node = SimpleNamespace(_on_security_event=on_security_event)
    node._refused_for_resources = lambda message, extra: DicomServer._refused_for_resources(
        node,  # type: ignore[arg-type]
        message,
        extra,
    )
    errors: list[BaseException] = []

    def answer() -> None:
        try:
            DicomServer._out_of_resources(
                node,  # type: ignore[arg-type]
                accepted,
                None,
                RuntimeError(),
                request_wait=request_wait,
            )
        except BaseException as exc:  # what escaped is the finding
            errors.append(exc)

    thread = threading.Thread(target=answer)
    thread.start()
    if request_after:
        client.settimeout(request_after)
        with pytest.raises(TimeoutError):
            early = client.recv(64)
            raise AssertionError(f"answered before the request: {early!r}")
    client.settimeout(5)
    client.sendall(request)
    received = b""
    try:
        while chunk := client.recv(64):
            received += chunk
    except TimeoutError:
        pass
    client.close()
    thread.join(5)
    accepted.close()
    return received, errors


def test_the_reject_is_sent_and_counted() -> None:
    counted: list[str] = []
    received, errors = _reject(counted.append)
    assert received == REJECT_LOCAL_LIMIT and not errors
    assert counted == ["out-of-resources"]


@pytest.mark.parametrize("failing", ["metric", "log"])
def test_the_reject_is_sent_when_nothing_more_can_be_allocated(
    failing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_memory(*_args: object, **_kwargs: object) -> None:
        raise MemoryError

    if failing == "log":
        monkeypatch.setattr("gateway.dicom.server.log.warning", no_memory)
        received, errors = _reject(lambda _kind: None)
    else:
        received, errors = _reject(no_memory)
    assert received == REJECT_LOCAL_LIMIT, "the peer got no answer"
    assert not errors


def test_the_reject_waits_for_the_request() -> None:
    """A requestor's A-ASSOCIATE-RQ may leave well after its connect (a busy process); the
    reject is sent once it has arrived, whole, and not before."""
    received, errors = _reject(lambda _kind: None, request_after=0.5)
    assert received == REJECT_LOCAL_LIMIT and not errors
    half = b"\x01\x00\x00\x00\x00\x44" + bytes(0x20)  # the rest never comes
    started = time.monotonic()
    received, errors = _reject(lambda _kind: None, request=half)
    assert received == REJECT_LOCAL_LIMIT and not errors
    assert time.monotonic() - started >= 1.5, "answered before the request was whole"


def test_a_peer_that_sends_nothing_is_answered_after_the_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("gateway.dicom.server.REQUEST_WAIT", 0.3)
    started = time.monotonic()
    received, errors = _reject(lambda _kind: None, request=b"")
    assert received == REJECT_LOCAL_LIMIT and not errors
    assert 0.25 <= time.monotonic() - started < 3


def test_without_a_wait_the_reject_goes_at_once() -> None:
    """The accept loop's refusal on a TLS port (the bytes would be a TLS handshake) does not
    wait for a request: a peer that has sent nothing is answered at once."""
    started = time.monotonic()
    received, errors = _reject(lambda _kind: None, request_wait=0, request=b"")
    assert received == REJECT_LOCAL_LIMIT and not errors
    assert time.monotonic() - started < 1.0
