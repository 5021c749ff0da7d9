"""TLS contexts over real loopback handshakes, with per-run CAs (nothing committed)."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
import warnings
from pathlib import Path

import pytest
from cryptography import x509

from gateway.crypto.tls import (
    IssuedCertificate,
    ca_init,
    ca_issue,
    certificate_sha256,
    check_pin,
    client_context,
    public_key_sha256,
    server_context,
)
from gateway.errors import CryptoError, IntegrityError


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, IssuedCertificate]:
    root = tmp_path_factory.mktemp("pki")
    ca_init(root / "ca")
    ca_init(root / "other-ca", key_type="ed25519")
    return {
        "server": ca_issue(root / "ca", "node-b", root / "b"),
        "client": ca_issue(root / "ca", "node-a", root / "a", key_type="ed25519"),
        "stranger": ca_issue(root / "other-ca", "node-a", root / "x"),
    }


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str = "node-b"
) -> tuple[BaseException | None, BaseException | None, ssl.SSLSocket | None]:
    """Run both sides over a socketpair; return (server error, client error, client socket)."""
    s_sock, c_sock = socket.socketpair()
    s_sock.settimeout(5)
    c_sock.settimeout(5)
    errors: dict[str, BaseException] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(s_sock, server_side=True) as tls:
                tls.sendall(tls.recv(5))
        except (ssl.SSLError, OSError) as exc:
            errors["server"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    client: ssl.SSLSocket | None = None
    try:
        client = client_ctx.wrap_socket(c_sock, server_hostname=server_hostname)
        client.sendall(b"hello")
        if client.recv(5) != b"hello":
            raise ssl.SSLError("no echo")
    except (ssl.SSLError, OSError) as exc:
        errors["client"] = exc
        c_sock.close()
    thread.join(10)
    return errors.get("server"), errors.get("client"), client


def mutual(pki: dict[str, IssuedCertificate], **kw: bool) -> ssl.SSLContext:
    s = pki["server"]
    return server_context(
        cert_file=s.cert_file, key_file=s.key_file, client_ca_file=s.ca_file, **kw
    )


def as_client(cert: IssuedCertificate, ca: IssuedCertificate, **kw: bool) -> ssl.SSLContext:
    return client_context(
        ca_file=ca.ca_file, cert_file=cert.cert_file, key_file=cert.key_file, **kw
    )


def test_issued_certificate_shape(pki: dict[str, IssuedCertificate]) -> None:
    s = pki["server"]
    assert stat.S_IMODE(s.key_file.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(s.cert_file.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["node-b", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert s.certificate_sha256 == certificate_sha256(cert)
    assert s.public_key_sha256 == public_key_sha256(cert)


def test_mutual_tls13_handshake(pki: dict[str, IssuedCertificate]) -> None:
    server_err, client_err, client = handshake(mutual(pki), as_client(pki["client"], pki["server"]))
    assert server_err is None and client_err is None and client is not None
    assert client.version() == "TLSv1.3"
    check_pin(client, certificate=pki["server"].certificate_sha256)
    check_pin(client, public_key=pki["server"].public_key_sha256)
    with pytest.raises(IntegrityError):
        check_pin(client, certificate=pki["client"].certificate_sha256)
    client.close()


def test_hostname_and_ip_san_verify(pki: dict[str, IssuedCertificate]) -> None:
    for name in ("localhost", "127.0.0.1"):
        server_err, client_err, client = handshake(
            mutual(pki), as_client(pki["client"], pki["server"]), name
        )
        assert server_err is None and client_err is None
        assert client is not None
        client.close()
    server_err, client_err, _ = handshake(
        mutual(pki), as_client(pki["client"], pki["server"]), "node-c"
    )
    assert isinstance(client_err, ssl.SSLCertVerificationError)


def test_client_certificate_from_another_ca_is_refused(
    pki: dict[str, IssuedCertificate],
) -> None:
    server_err, client_err, _ = handshake(mutual(pki), as_client(pki["stranger"], pki["server"]))
    assert isinstance(server_err, ssl.SSLError)
    assert client_err is not None


def test_missing_client_certificate_is_refused(pki: dict[str, IssuedCertificate]) -> None:
    no_cert = client_context(ca_file=pki["server"].ca_file)
    server_err, client_err, _ = handshake(mutual(pki), no_cert)
    assert isinstance(server_err, ssl.SSLError)
    assert client_err is not None


def test_client_refuses_server_from_another_ca(pki: dict[str, IssuedCertificate]) -> None:
    _server_err, client_err, _ = handshake(mutual(pki), as_client(pki["client"], pki["stranger"]))
    assert isinstance(client_err, ssl.SSLCertVerificationError)


def test_old_protocols_refused(pki: dict[str, IssuedCertificate]) -> None:
    tls12 = as_client(pki["client"], pki["server"], allow_tls12=True)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    server_err, _, _ = handshake(mutual(pki), tls12)
    assert isinstance(server_err, ssl.SSLError)  # TLS 1.3 only by default

    server_err, client_err, client = handshake(mutual(pki, allow_tls12=True), tls12)
    assert server_err is None and client_err is None and client is not None
    assert client.version() == "TLSv1.2"
    name, _, _ = client.cipher() or ("", "", 0)
    assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name)
    client.close()

    # A TLS 1.1 ClientHello reaches the server, which answers protocol_version and fails.
    tls11 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls11.load_verify_locations(cafile=pki["server"].ca_file)
    tls11.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tls11.minimum_version = ssl.TLSVersion.TLSv1
        tls11.maximum_version = ssl.TLSVersion.TLSv1_1
    server_err, client_err, _ = handshake(mutual(pki, allow_tls12=True), tls11)
    assert isinstance(server_err, ssl.SSLError)
    assert client_err is not None
    for ctx in (mutual(pki), mutual(pki, allow_tls12=True)):
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
        assert ctx.verify_mode == ssl.CERT_REQUIRED


def test_contexts_never_skip_verification(pki: dict[str, IssuedCertificate]) -> None:
    ctx = client_context(ca_file=pki["server"].ca_file)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    with pytest.raises(CryptoError):
        server_context(
            cert_file=pki["server"].cert_file,
            key_file=pki["server"].key_file,
            require_client_cert=True,
        )


def test_ca_is_idempotent_and_keys_are_protected(tmp_path: Path) -> None:
    ca_cert = ca_init(tmp_path / "ca")
    before = ca_cert.read_bytes()
    assert ca_init(tmp_path / "ca").read_bytes() == before
    issued = ca_issue(tmp_path / "ca", "node-a", tmp_path / "out")
    with pytest.raises(CryptoError, match="already exists"):
        ca_issue(tmp_path / "ca", "node-a", tmp_path / "out")
    with pytest.raises(CryptoError, match="DNS name"):
        ca_issue(tmp_path / "ca", "Node A", tmp_path / "out")
    issued.key_file.chmod(0o644)
    with pytest.raises(CryptoError, match=str(issued.key_file)):
        server_context(
            cert_file=issued.cert_file, key_file=issued.key_file, require_client_cert=False
        )


def test_real_tcp_socket_on_loopback(pki: dict[str, IssuedCertificate]) -> None:
    server_ctx = mutual(pki)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        result: dict[str, object] = {}

        def accept() -> None:
            conn, _ = listener.accept()
            conn.settimeout(5)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                peer = tls.getpeercert()
                result["peer"] = peer["subject"] if peer else None
                tls.sendall(b"ok")

        thread = threading.Thread(target=accept)
        thread.start()
        client_ctx = as_client(pki["client"], pki["server"])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.recv(2) == b"ok"
        thread.join(5)
    assert result["peer"] == ((("commonName", "node-a"),),)
