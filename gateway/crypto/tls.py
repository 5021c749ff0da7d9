"""TLS contexts with BCP 195 defaults, a small deployment CA and fingerprints for pinning.

BCP 195 (RFC 9325, 2022): TLS 1.3 by default; TLS 1.2 only when a deployment allows it and
then only ECDHE key exchange with AEAD ciphers (AES-GCM, ChaCha20-Poly1305); no compression,
no renegotiation; clients always verify the server (``CERT_REQUIRED``, hostname checked);
servers require a client certificate when configured. Nothing here builds a context that
skips verification.

The CA is for sites without their own PKI: ``ca_init`` makes a self-signed CA, ``ca_issue``
a node certificate for both server and client authentication with SANs for the node name,
``localhost``, 127.0.0.1 and ::1 (``issue_node_certificate`` writes the same, CA-signed or
self-signed, to given paths). Keys are ECDSA P-256 (widest support, including DCMTK) or
Ed25519. Private keys are written 0600 and never overwritten.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import secrets
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.crypto.keys import read_private_file, write_private_file
from gateway.errors import CryptoError, IntegrityError

KeyType = Literal["ecdsa-p256", "ed25519"]
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
_NODE_NAME = re.compile(
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)
_SKEW = timedelta(minutes=5)


# --- contexts -------------------------------------------------------------------------------


def _base_context(purpose: ssl.Purpose, allow_tls12: bool) -> ssl.SSLContext:
    protocol = (
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2 if allow_tls12 else ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    if allow_tls12:
        ctx.set_ciphers(TLS12_CIPHERS)  # TLS 1.3 suites are all AEAD and stay as they are
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    # key policy, whatever the system's OpenSSL default: security level 2 refuses peer
    # certificates with RSA/DSA/DH keys under 2048 bits, EC keys under 224 bits and SHA-1
    # signatures (FAULTS F14, "wrong key type"); TLS 1.3 itself has no DSA
    ctx.set_ciphers((TLS12_CIPHERS if allow_tls12 else "DEFAULT") + ":@SECLEVEL=2")
    return ctx


def _load_crl(ctx: ssl.SSLContext, crl_file: Path | None) -> None:
    """Check the peer's certificate against the CRL(s) in ``crl_file`` (PEM), issued by the
    CA it chains to: a listed certificate fails the handshake ("certificate revoked")."""
    if crl_file is None:
        return
    try:
        ctx.load_verify_locations(cafile=crl_file)
    except (ssl.SSLError, OSError) as exc:
        raise CryptoError(f"{crl_file}: cannot load the certificate revocation list") from exc
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def _load_chain(ctx: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    read_private_file(Path(key_file))  # refuse a key file others can read, naming it
    try:
        ctx.load_cert_chain(certfile=cert_file, keyfile=key_file)
    except (ssl.SSLError, OSError) as exc:
        raise CryptoError(f"{cert_file}, {key_file}: cannot load certificate and key") from exc


def _load_ca(ctx: ssl.SSLContext, ca_file: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise CryptoError(f"{ca_file}: cannot load CA certificates") from exc


def server_context(
    *,
    cert_file: Path,
    key_file: Path,
    client_ca_file: Path | None = None,
    require_client_cert: bool = True,
    allow_tls12: bool = False,
    crl_file: Path | None = None,
) -> ssl.SSLContext:
    """A server context; with ``require_client_cert`` clients must present a certificate
    that chains to ``client_ca_file`` (required then), else the handshake fails."""
    ctx = _base_context(ssl.Purpose.CLIENT_AUTH, allow_tls12)
    _load_chain(ctx, cert_file, key_file)
    if require_client_cert:
        if client_ca_file is None:
            raise CryptoError("require_client_cert needs client_ca_file")
        ctx.verify_mode = ssl.CERT_REQUIRED
    if client_ca_file is not None:
        _load_ca(ctx, client_ca_file)
        if not require_client_cert:
            ctx.verify_mode = ssl.CERT_OPTIONAL
    _load_crl(ctx, crl_file)
    return ctx


def client_context(
    *,
    ca_file: Path,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    allow_tls12: bool = False,
    crl_file: Path | None = None,
) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca_file`` and checks its name.

    Give ``cert_file`` and ``key_file`` for mutual TLS. To pin, also call :func:`check_pin`
    on the connected socket.
    """
    ctx = _base_context(ssl.Purpose.SERVER_AUTH, allow_tls12)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    _load_ca(ctx, ca_file)
    _load_crl(ctx, crl_file)
    if (cert_file is None) != (key_file is None):
        raise CryptoError("client certificate and key must be given together")
    if cert_file is not None and key_file is not None:
        _load_chain(ctx, cert_file, key_file)
    return ctx


# --- fingerprints and pinning -------------------------------------------------------------


def certificate_sha256(cert: x509.Certificate | bytes) -> str:
    """SHA-256 (hex) of the certificate's DER encoding."""
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def public_key_sha256(cert: x509.Certificate | bytes) -> str:
    """SHA-256 (hex) of the certificate's SubjectPublicKeyInfo (survives re-issuing)."""
    if isinstance(cert, bytes):
        cert = x509.load_der_x509_certificate(cert)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def check_pin(
    conn: ssl.SSLSocket | ssl.SSLObject,
    *,
    certificate: str | None = None,
    public_key: str | None = None,
) -> None:
    """Raise IntegrityError unless the peer's certificate matches the pinned fingerprint(s)."""
    if certificate is None and public_key is None:
        raise CryptoError("check_pin needs a certificate or public key fingerprint")
    der = conn.getpeercert(binary_form=True)
    if der is None:
        raise IntegrityError("peer presented no certificate to check against its pin")
    if certificate is not None and not secrets.compare_digest(certificate_sha256(der), certificate):
        raise IntegrityError("peer certificate does not match its pinned fingerprint")
    if public_key is not None and not secrets.compare_digest(public_key_sha256(der), public_key):
        raise IntegrityError("peer public key does not match its pinned fingerprint")


# --- deployment CA ------------------------------------------------------------------------


def _new_key(key_type: KeyType) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _sign_hash(key: object) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _load_deployment_ca(
    ca_dir: Path,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey]:
    key_path = ca_dir / CA_KEY
    try:
        key = serialization.load_pem_private_key(read_private_file(key_path), password=None)
        cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    except (ValueError, OSError) as exc:
        raise CryptoError(f"{ca_dir}: cannot load the CA key and certificate") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise CryptoError(f"{key_path}: CA key must be ECDSA or Ed25519")
    return cert, key


def ca_init(
    ca_dir: Path,
    *,
    name: str = "dicom-gateway deployment CA",
    key_type: KeyType = "ecdsa-p256",
    valid_days: int = 3650,
    now: datetime | None = None,
) -> Path:
    """Create a self-signed CA in ``ca_dir`` (``ca.key`` 0600, ``ca.crt``) unless one exists.

    Returns the CA certificate's path. An existing CA is kept as it is.
    """
    ca_dir = Path(ca_dir)
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (ca_dir / CA_KEY).exists():
        _load_deployment_ca(ca_dir)
        return ca_dir / CA_CERT
    now = now or datetime.now(UTC)
    key = _new_key(key_type)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, _sign_hash(key))
    )
    if not write_private_file(ca_dir / CA_KEY, _key_pem(key)):
        raise CryptoError(f"{ca_dir / CA_KEY}: appeared while the CA was being made")
    _write_public(ca_dir / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return ca_dir / CA_CERT


@dataclass(frozen=True)
class IssuedCertificate:
    """Where ``ca_issue`` wrote a node's key, certificate and CA, and their fingerprints."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    certificate_sha256: str
    public_key_sha256: str


def ca_issue(
    ca_dir: Path,
    node_name: str,
    out_dir: Path,
    *,
    key_type: KeyType = "ecdsa-p256",
    valid_days: int = 397,
    now: datetime | None = None,
) -> IssuedCertificate:
    """Issue a server-and-client certificate for ``node_name`` into ``out_dir``.

    Writes ``<node_name>.key`` (0600), ``<node_name>.crt`` and a copy of ``ca.crt``. The
    name must be a lowercase DNS name; it is the certificate's CN and first SAN, beside
    ``localhost``, 127.0.0.1 and ::1. Refuses to overwrite an existing key.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return issue_node_certificate(
        node_name,
        cert_file=out_dir / f"{node_name}.crt",
        key_file=out_dir / f"{node_name}.key",
        ca_dir=Path(ca_dir),
        ca_copy=out_dir / CA_CERT,
        key_type=key_type,
        valid_days=valid_days,
        now=now,
    )


def issue_node_certificate(
    node_name: str,
    *,
    cert_file: Path,
    key_file: Path,
    ca_dir: Path | None = None,
    ca_copy: Path | None = None,
    key_type: KeyType = "ecdsa-p256",
    valid_days: int = 397,
    now: datetime | None = None,
) -> IssuedCertificate:
    """Write a node key (0600) and certificate to the given paths.

    Signed by the deployment CA in ``ca_dir`` (its certificate copied to ``ca_copy`` if
    given), or self-signed without one: then the certificate is its own trust anchor, and
    peers trust it by that file or its pin. Refuses to overwrite an existing key.
    """
    if not _NODE_NAME.fullmatch(node_name) or len(node_name) > 253:
        raise CryptoError(f"node name {node_name!r} is not a lowercase DNS name")
    key_path, cert_path = Path(key_file), Path(cert_file)
    if key_path.exists():
        raise CryptoError(f"{key_path}: already exists; not overwriting a node key")
    now = now or datetime.now(UTC)
    key = _new_key(key_type)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)])
    if ca_dir is not None:
        ca_cert, ca_key = _load_deployment_ca(Path(ca_dir))
        issuer, signer, not_after = ca_cert.subject, ca_key, ca_cert.not_valid_after_utc
        authority = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    else:
        ca_cert, issuer, signer, not_after = None, subject, key, now + timedelta(days=valid_days)
        authority = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    sans: list[x509.GeneralName] = [
        x509.DNSName(node_name),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    if node_name == "localhost":
        sans.pop(1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(min(now + timedelta(days=valid_days), not_after))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(authority),
            critical=False,
        )
        .sign(signer, _sign_hash(signer))
    )
    if not write_private_file(key_path, _key_pem(key)):
        raise CryptoError(f"{key_path}: already exists; not overwriting a node key")
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    ca_file = cert_path
    if ca_cert is not None:
        ca_file = ca_copy or Path(ca_dir or ".") / CA_CERT
        if ca_copy is not None:
            _write_public(ca_copy, ca_cert.public_bytes(serialization.Encoding.PEM))
    return IssuedCertificate(
        cert_file=cert_path,
        key_file=key_path,
        ca_file=ca_file,
        certificate_sha256=certificate_sha256(cert),
        public_key_sha256=public_key_sha256(cert),
    )
