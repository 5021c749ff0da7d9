"""The peer channel's TLS contexts: a peer's own certificate is the anchor; expired or
unknown client certificates fail the handshake; the client pins the server's certificate."""

from __future__ import annotations

import socket
import ssl
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.config import load_config
from gateway.config.model import GatewayConfig
from gateway.crypto.tls import certificate_sha256, issue_node_certificate
from gateway.peer.channel import client_peer_context, server_peer_context
from gateway.peer.material import PeerTrust


def _cfg(tmp_path: Path, name: str) -> GatewayConfig:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[node]\nname = "{name}"\nstate_dir = "{name}"\n')
    cfg = load_config(path)
    (cfg.state_dir / "keys").mkdir(parents=True, mode=0o700)
    return cfg


def _peer(cfg: GatewayConfig, name: str, *, now: datetime | None = None) -> PeerTrust:
    issue_node_certificate(
        name, cert_file=cfg.tls_cert_file, key_file=cfg.tls_key_file, now=now, valid_days=2
    )
    cert = x509.load_pem_x509_certificate(cfg.tls_cert_file.read_bytes())
    return PeerTrust(
        name=name,
        url="https://127.0.0.1:1",
        timeout=5,
        cert_file=cfg.tls_cert_file,
        certificate_sha256=certificate_sha256(cert),
        signing_key=ed25519.Ed25519PrivateKey.generate().public_key(),
        hpke={},
    )


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[str, str]:
    a, b = socket.socketpair()
    result: dict[str, str] = {}

    def serve() -> None:
        try:
            with server.wrap_socket(a, server_side=True) as conn:
                conn.recv(1)
            result["server"] = "ok"
        except (ssl.SSLError, OSError) as exc:
            result["server"] = type(exc).__name__

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(b, server_hostname="127.0.0.1") as conn:
            conn.sendall(b"x")
            conn.recv(1)
        client_result = "ok"
    except (ssl.SSLError, OSError) as exc:
        client_result = type(exc).__name__
    thread.join(10)
    return result.get("server", "none"), client_result


@pytest.fixture
def pair(tmp_path: Path) -> tuple[GatewayConfig, GatewayConfig, PeerTrust, PeerTrust]:
    a, b = _cfg(tmp_path, "node-a"), _cfg(tmp_path, "node-b")
    return a, b, _peer(a, "node-a"), _peer(b, "node-b")


def test_peers_handshake(pair: tuple[GatewayConfig, GatewayConfig, PeerTrust, PeerTrust]) -> None:
    a, b, trust_a, trust_b = pair
    server = server_peer_context(b, [trust_a])
    assert _handshake(server, client_peer_context(a, trust_b))[0] == "ok"


def test_expired_client_certificate_fails(tmp_path: Path) -> None:
    a, b = _cfg(tmp_path, "node-a"), _cfg(tmp_path, "node-b")
    trust_a = _peer(a, "node-a", now=datetime.now(UTC) - timedelta(days=30))
    trust_b = _peer(b, "node-b")
    server_result, _ = _handshake(
        server_peer_context(b, [trust_a]), client_peer_context(a, trust_b)
    )
    assert server_result != "ok"


def test_client_refuses_a_server_that_does_not_match_its_pin(
    pair: tuple[GatewayConfig, GatewayConfig, PeerTrust, PeerTrust],
) -> None:
    a, b, trust_a, trust_b = pair
    wrong = PeerTrust(**{**trust_b.__dict__, "certificate_sha256": "0" * 64})
    _, client_result = _handshake(server_peer_context(b, [trust_a]), client_peer_context(a, wrong))
    assert client_result == "SSLCertVerificationError"
