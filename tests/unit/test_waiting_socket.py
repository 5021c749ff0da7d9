"""WaitingSocket (the node's outgoing associations): a TLS client's socket that turns
readable with a TLS 1.3 session ticket is not ready and does not block; PDU bytes read
ahead are given out first by recv(), in order."""

from __future__ import annotations

import select
import socket
import ssl
import threading
from pathlib import Path

from gateway.crypto.tls import ca_init
from gateway.dicom.reactor import WaitingSocket
from tests.support.certs import issue


def _tls_pair(tmp_path: Path) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    ca_init(tmp_path / "ca")
    cert = issue(tmp_path / "ca", "server", tmp_path / "server", sans=["server"])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    server_ctx.load_cert_chain(cert.cert_file, cert.key_file)
    server_ctx.num_tickets = 2  # sent right after the handshake
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(tmp_path / "ca" / "ca.crt")
    a, b = socket.socketpair()
    done: list[ssl.SSLSocket] = []
    server = threading.Thread(
        target=lambda: done.append(server_ctx.wrap_socket(b, server_side=True))
    )
    server.start()
    client = client_ctx.wrap_socket(a, server_hostname="server")
    server.join(10)
    return client, done[0]


def _reader(client: ssl.SSLSocket) -> WaitingSocket:
    sock = WaitingSocket.__new__(WaitingSocket)  # no association: the TLS part alone
    sock._stash = bytearray()
    sock.socket = client
    return sock


def test_session_ticket_is_not_a_pdu(tmp_path: Path) -> None:
    client, server = _tls_pair(tmp_path)
    try:
        readable, _, _ = select.select([client], [], [], 5)
        assert readable, "the server's session tickets make the client socket readable"
        reader = _reader(client)
        client.settimeout(5)
        assert reader._read_ahead(client) is False  # nothing for us, and no block
        assert client.gettimeout() == 5  # restored

        server.sendall(b"\x04\x00PDU-BYTES")
        select.select([client], [], [], 5)
        assert reader._read_ahead(client) is True
        assert bytes(reader.recv(2)) == b"\x04\x00"  # from what was read ahead
        server.sendall(b"-MORE")
        assert bytes(reader.recv(14)) == b"PDU-BYTES-MORE"  # the rest, then the socket
        assert not reader._stash
    finally:
        client.close()
        server.close()


def test_peer_closing_is_ready_and_recv_returns_short(tmp_path: Path) -> None:
    client, server = _tls_pair(tmp_path)
    try:
        server.close()
        select.select([client], [], [], 5)
        reader = _reader(client)
        assert reader._read_ahead(client) is True  # the end: the read that follows meets it
        assert bytes(reader.recv(6)) == b""
    finally:
        client.close()
