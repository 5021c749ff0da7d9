"""Raw DICOM upper-layer PDUs and TLS records for attacking a node, and /proc probes.

Tests craft hostile bytes here on purpose (the product never hand-rolls PDUs): well-formed
PDUs come from pynetdicom's encoders, broken ones are made by cutting or patching those, and
a real ClientHello comes from the ``ssl`` module through memory BIOs.

This module must not import ``gateway``.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any

from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    P_DATA,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"

# PS3.8 9.3.6 / 9.3.7: A-RELEASE-RQ and A-RELEASE-RP, 4 reserved bytes each
RELEASE_RQ = struct.pack(">BBL", 0x05, 0x00, 4) + b"\x00" * 4
RELEASE_RP = struct.pack(">BBL", 0x06, 0x00, 4) + b"\x00" * 4
ABORT = struct.pack(">BBL", 0x07, 0x00, 4) + b"\x00\x00\x00\x00"


def associate_rq(
    calling: str = "MODALITY",
    called: str = "GATEWAY",
    abstract_syntax: str = VERIFICATION,
    max_length: int = 16384,
) -> bytes:
    """An encoded A-ASSOCIATE-RQ proposing one context (ID 1) for ``abstract_syntax``."""
    prim = A_ASSOCIATE()
    prim.application_context_name = APPLICATION_CONTEXT
    prim.calling_ae_title = calling
    prim.called_ae_title = called
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = max_length
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.1"
    prim.user_information = [max_len, impl]
    cx = build_context(abstract_syntax)
    cx.context_id = 1
    prim.presentation_context_definition_list = [cx]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def pdata_tf(*items: tuple[int, int, bytes]) -> bytes:
    """A well-formed P-DATA-TF PDU of (context ID, control header, data) items, by
    pynetdicom's encoder (:func:`p_data` builds raw ones, to be broken)."""
    primitive = P_DATA()
    value_list: Any = [[ctx, bytes([ctrl]) + data] for ctx, ctrl, data in items]
    primitive.presentation_data_value_list = value_list
    return bytes(P_DATA_TF(primitive).encode())


def p_data(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF of ``(context_id, message_control_header, fragment)`` PDVs (PS3.8 9.3.5)."""
    body = b"".join(
        struct.pack(">LBB", len(fragment) + 2, cx, header) + fragment
        for cx, header, fragment in pdvs
    )
    return struct.pack(">BBL", 0x04, 0x00, len(body)) + body


def client_hello(server_name: str = "localhost") -> bytes:
    """The first flight of a real TLS client (a whole ClientHello record)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


# --------------------------------------------------------------------------- reading answers


def read_pdu(sock: socket.socket) -> bytes:
    """One whole PDU, or b"" if the node closed the connection first."""
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return b""
        header += chunk
    length = struct.unpack(">L", header[2:6])[0]
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return header + body


def wait_closed(sock: socket.socket, timeout: float) -> tuple[float, bytes]:
    """Read until the node closes; return (seconds it took, bytes received)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"connection still open after {timeout}s; got {data!r}") from None
    return time.monotonic() - started, data


def is_abort_or_empty(data: bytes) -> bool:
    """What a node may answer before closing: nothing, or an A-ABORT PDU."""
    return data == b"" or (data[0] == 0x07 and len(data) >= 10)


def first_pdu_type(data: bytes) -> int | None:
    return data[0] if data else None


def rejection(assoc: Any) -> tuple[Any, Any, Any]:
    """(result, source, diagnostic) of the A-ASSOCIATE-RJ a pynetdicom requestor got.

    pynetdicom 3.0.4's requestor, once its connect is done, looks whether its socket is
    connected, and a reject that came back before it looked has closed it (FSM
    Sta5+Evt4->Sta1): it aborts without reading the reject, which its DUL left in the queue
    to the user. The reject is taken from there then."""
    rj = getattr(assoc.acceptor, "primitive", None)
    if rj is None:
        rj = next(
            (p for p in list(assoc.dul.to_user_queue.queue) if isinstance(p, A_ASSOCIATE)),
            None,
        )
    return (
        getattr(rj, "result", None),
        getattr(rj, "result_source", None),
        getattr(rj, "diagnostic", None),
    )


# --------------------------------------------------------------------------- /proc probes


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (KiB) and Threads from /proc/PID/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def rss_kib(pid: int) -> int:
    return proc_status(pid)["VmRSS"]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
