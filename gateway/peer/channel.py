"""The TLS contexts of the peer channel: mutual TLS (BCP 195), each side pinning the other.

Trust anchors are the peers' own certificates (``<peer dir>/tls.crt``), loaded with
``VERIFY_X509_PARTIAL_CHAIN``: a certificate verifies only if it *is* one of them (whatever
CA issued it), within its validity period. Server side, a client without a certificate,
with one from another CA, an unknown or an expired one fails the handshake. Client side,
the server must name the URL's host and its certificate's SHA-256 must match the peer
entry's: checked inside the handshake (a pinning ``SSLObject``), so not a byte of a request
goes to a server that does not match.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable

from gateway.config import GatewayConfig
from gateway.crypto.tls import check_pin, client_context, server_context
from gateway.errors import CryptoError, IntegrityError
from gateway.peer.material import PeerTrust


def server_peer_context(cfg: GatewayConfig, peers: Iterable[PeerTrust]) -> ssl.SSLContext:
    """The endpoint's context: client certificates must be one of the peers'."""
    anchors = [p.cert_file for p in peers]
    if not anchors:
        raise CryptoError("[peer] is enabled but no [[peers]] are configured to accept")
    ctx = server_context(
        cert_file=cfg.tls_cert_file,
        key_file=cfg.tls_key_file,
        client_ca_file=anchors[0],
        require_client_cert=True,
        allow_tls12=cfg.peer.allow_tls12,
    )
    for anchor in anchors[1:]:
        try:
            ctx.load_verify_locations(cafile=anchor)
        except (ssl.SSLError, OSError) as exc:
            raise CryptoError(f"{anchor}: cannot load the peer certificate") from exc
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


class _PinnedSSLObject(ssl.SSLObject):
    """Fails the handshake unless the server's certificate has the pinned SHA-256."""

    pinned_sha256 = ""

    def do_handshake(self) -> None:
        super().do_handshake()
        try:
            check_pin(self, certificate=self.pinned_sha256)
        except IntegrityError as exc:
            raise ssl.SSLCertVerificationError(str(exc)) from exc


class _PinnedSSLSocket(ssl.SSLSocket):
    """The same check for blocking sockets (``wrap_socket``)."""

    pinned_sha256 = ""

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        try:
            check_pin(self, certificate=self.pinned_sha256)
        except IntegrityError as exc:
            raise ssl.SSLCertVerificationError(str(exc)) from exc


def client_peer_context(cfg: GatewayConfig, peer: PeerTrust) -> ssl.SSLContext:
    """A context towards ``peer``: our certificate, its certificate as anchor and pin."""
    ctx = client_context(
        ca_file=peer.cert_file,
        cert_file=cfg.tls_cert_file,
        key_file=cfg.tls_key_file,
        allow_tls12=cfg.peer.allow_tls12,
    )
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    pin = {"pinned_sha256": peer.certificate_sha256}
    ctx.sslobject_class = type("PinnedSSLObject", (_PinnedSSLObject,), pin)
    ctx.sslsocket_class = type("PinnedSSLSocket", (_PinnedSSLSocket,), pin)
    return ctx


def handshake_reason(exc: BaseException) -> str:
    """A short, bounded reason for the audit log (OpenSSL's reason code, never peer bytes)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return "certificate-verify-failed: " + str(exc.verify_message)[:120]
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or "ssl-error").lower().replace("_", "-")
    return "connection-closed"
