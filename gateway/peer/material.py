"""What nodes exchange to trust each other: ``peers export`` and ``peers add``, and loading it.

An export is JSON (public material only, never a private key)::

    {"format": "dicom-gateway/peer-export/v1", "name": NODE, "url": "https://HOST:PORT",
     "tls_certificate": PEM, "tls_certificate_sha256": HEX, "tls_public_key_sha256": HEX,
     "signing_public_key": PEM (Ed25519), "signing_public_key_sha256": HEX (raw key),
     "hpke": {"x25519": {"public_key": PEM, "key_id": HEX},
              "mlkem768-x25519": {"public_key": PEM (ML-KEM-768) + PEM (X25519), "key_id": HEX}}}

``peers add`` checks that the fingerprints match the material and writes it to the peers
store, ``<state_dir>/peers/<name>/``: ``tls.crt``, ``signing.pub``, ``hpke-x25519.pub`` and
``hpke-mlkem768-x25519.pub`` (when exported). A ``[[peers]]`` entry names the peer and its
URL; its ``dir`` points elsewhere when the material comes from another place.

The peer's certificate is pinned: it is the trust anchor its TLS connections must chain to
(whatever CA issued it) and its SHA-256 must match, on both ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from gateway.config import GatewayConfig
from gateway.config.model import PeerEntry
from gateway.crypto import keys as node_keys
from gateway.crypto.seal import HpkeSuite, RecipientKey, RecipientPrivateKey
from gateway.crypto.tls import certificate_sha256, public_key_sha256
from gateway.errors import CryptoError

EXPORT_FORMAT: Final = "dicom-gateway/peer-export/v1"
TLS_CERT: Final = "tls.crt"
SIGNING_PUB: Final = "signing.pub"
HPKE_PUB: Final = {
    HpkeSuite.X25519: "hpke-x25519.pub",
    HpkeSuite.MLKEM768_X25519: "hpke-mlkem768-x25519.pub",
}
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PEM_BLOCK = re.compile(rb"-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----\n?", re.DOTALL)


def _pem_public(key: Any) -> bytes:
    data: bytes = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def _raw_sha256(key: ed25519.Ed25519PublicKey | x25519.X25519PublicKey) -> str:
    return hashlib.sha256(key.public_bytes_raw()).hexdigest()


# --- this node ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OwnKeys:
    """This node's peer material: signing key, HPKE private keys by suite, TLS files."""

    name: str
    signing_key: ed25519.Ed25519PrivateKey = field(repr=False)
    hpke: Mapping[HpkeSuite, RecipientPrivateKey] = field(repr=False)
    cert_file: Path
    key_file: Path


def load_own_keys(cfg: GatewayConfig) -> OwnKeys:
    """Load the keys ``keys init`` made; CryptoError names what is missing or unsafe."""
    hpke = {
        HpkeSuite.X25519: RecipientPrivateKey.from_x25519(node_keys.load_hpke_key(cfg.state_dir))
    }
    hybrid_path = node_keys.keys_dir(cfg.state_dir) / node_keys.HPKE_HYBRID_KEY
    if hybrid_path.exists():
        pq, classic = node_keys.load_hpke_hybrid_key(cfg.state_dir)
        hpke[HpkeSuite.MLKEM768_X25519] = RecipientPrivateKey.from_hybrid(pq, classic)
    return OwnKeys(
        name=cfg.node.name,
        signing_key=node_keys.load_signing_key(cfg.state_dir),
        hpke=hpke,
        cert_file=cfg.tls_cert_file,
        key_file=cfg.tls_key_file,
    )


def export_material(cfg: GatewayConfig) -> dict[str, Any]:
    """The JSON another node needs to trust this one (public material and fingerprints)."""
    own = load_own_keys(cfg)
    try:
        cert_pem = own.cert_file.read_bytes()
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (OSError, ValueError) as exc:
        raise CryptoError(f"{own.cert_file}: cannot read the TLS certificate (keys init)") from exc
    signing = own.signing_key.public_key()
    hpke: dict[str, Any] = {}
    for suite, key in own.hpke.items():
        if suite is HpkeSuite.X25519:
            pem = _pem_public(x25519.X25519PublicKey.from_public_bytes(key.public.public_bytes))
        else:
            pq, classic = node_keys.load_hpke_hybrid_key(cfg.state_dir)
            pem = _pem_public(pq.public_key()) + _pem_public(classic.public_key())
        hpke[suite.value] = {"public_key": pem.decode("ascii"), "key_id": key.public.key_id}
    return {
        "format": EXPORT_FORMAT,
        "name": cfg.node.name,
        "url": cfg.peer_url,
        "tls_certificate": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        "tls_certificate_sha256": certificate_sha256(cert),
        "tls_public_key_sha256": public_key_sha256(cert),
        "signing_public_key": _pem_public(signing).decode("ascii"),
        "signing_public_key_sha256": _raw_sha256(signing),
        "hpke": hpke,
    }


# --- other nodes -------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerTrust:
    """A peer's trusted material, loaded from its folder."""

    name: str
    url: str
    timeout: float
    cert_file: Path
    certificate_sha256: str
    signing_key: ed25519.Ed25519PublicKey
    hpke: Mapping[HpkeSuite, RecipientKey]


def _parse_hpke(suite: HpkeSuite, pem: bytes, where: str) -> RecipientKey:
    blocks = _PEM_BLOCK.findall(pem)
    try:
        keys = [serialization.load_pem_public_key(b) for b in blocks]
    except ValueError as exc:
        raise CryptoError(f"{where}: not PEM public keys") from exc
    if suite is HpkeSuite.X25519:
        if len(keys) == 1 and isinstance(keys[0], x25519.X25519PublicKey):
            return RecipientKey.from_x25519(keys[0])
        raise CryptoError(f"{where}: expected one X25519 public key")
    if (
        len(keys) == 2
        and isinstance(keys[0], mlkem.MLKEM768PublicKey)
        and isinstance(keys[1], x25519.X25519PublicKey)
    ):
        return RecipientKey.from_hybrid(keys[0], keys[1])
    raise CryptoError(f"{where}: expected an ML-KEM-768 then an X25519 public key")


def _parse_signing(pem: bytes, where: str) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise CryptoError(f"{where}: not a PEM public key") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise CryptoError(f"{where}: expected an Ed25519 public key")
    return key


def _parse_cert(pem: bytes, where: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CryptoError(f"{where}: not a PEM certificate") from exc


def load_peer(cfg: GatewayConfig, entry: PeerEntry) -> PeerTrust:
    """Load one ``[[peers]]`` entry's material; CryptoError names the file that is wrong."""
    folder = cfg.peer_dir(entry)
    try:
        cert_file = folder / TLS_CERT
        cert = _parse_cert(cert_file.read_bytes(), str(cert_file))
        signing_file = folder / SIGNING_PUB
        signing = _parse_signing(signing_file.read_bytes(), str(signing_file))
        hpke: dict[HpkeSuite, RecipientKey] = {}
        for suite, name in HPKE_PUB.items():
            if (folder / name).exists():
                hpke[suite] = _parse_hpke(suite, (folder / name).read_bytes(), str(folder / name))
    except OSError as exc:
        raise CryptoError(
            f"{folder}: peer {entry.name}'s material is missing ({exc.strerror}); "
            "run `dicom-gateway peers add`"
        ) from exc
    if HpkeSuite.X25519 not in hpke:
        raise CryptoError(f"{folder / HPKE_PUB[HpkeSuite.X25519]}: missing")
    return PeerTrust(
        name=entry.name,
        url=entry.url.rstrip("/"),
        timeout=entry.timeout,
        cert_file=folder / TLS_CERT,
        certificate_sha256=certificate_sha256(cert),
        signing_key=signing,
        hpke=hpke,
    )


def load_peers(cfg: GatewayConfig) -> dict[str, PeerTrust]:
    return {entry.name: load_peer(cfg, entry) for entry in cfg.peers}


def add_peer(cfg: GatewayConfig, export: Mapping[str, Any]) -> tuple[Path, str]:
    """Check an export and write it to the peers store; return (folder, [[peers]] TOML).

    Every fingerprint in the export must match its material. An existing folder for the
    same name is replaced only by identical material (re-adding is harmless); other
    material raises CryptoError: remove the folder first to re-key a peer on purpose.
    """
    if export.get("format") != EXPORT_FORMAT:
        raise CryptoError(f"not a {EXPORT_FORMAT} document")
    name, url = export.get("name"), export.get("url")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CryptoError("export: name must be 1-64 of letters, digits, '-', '_', '.'")
    if not isinstance(url, str) or not url.startswith("https://"):
        raise CryptoError("export: url must be https://HOST:PORT")
    try:
        cert_pem = str(export["tls_certificate"]).encode("ascii")
        signing_pem = str(export["signing_public_key"]).encode("ascii")
        hpke_in = export["hpke"]
        if not isinstance(hpke_in, Mapping):
            raise TypeError("hpke")
        cert = _parse_cert(cert_pem, "export tls_certificate")
        if certificate_sha256(cert) != export["tls_certificate_sha256"]:
            raise CryptoError("export: tls_certificate_sha256 does not match the certificate")
        if public_key_sha256(cert) != export["tls_public_key_sha256"]:
            raise CryptoError("export: tls_public_key_sha256 does not match the certificate")
        signing = _parse_signing(signing_pem, "export signing_public_key")
        if _raw_sha256(signing) != export["signing_public_key_sha256"]:
            raise CryptoError("export: signing_public_key_sha256 does not match the key")
        files = {TLS_CERT: cert_pem, SIGNING_PUB: signing_pem}
        for suite_name, item in hpke_in.items():
            suite = HpkeSuite(suite_name)
            pem = str(item["public_key"]).encode("ascii")
            key = _parse_hpke(suite, pem, f"export hpke {suite_name}")
            if key.key_id != item["key_id"]:
                raise CryptoError(f"export: hpke {suite_name} key_id does not match the key")
            files[HPKE_PUB[suite]] = pem
    except (KeyError, TypeError, ValueError, UnicodeEncodeError) as exc:
        raise CryptoError(f"export: malformed ({exc.__class__.__name__}: {exc})") from exc
    if HPKE_PUB[HpkeSuite.X25519] not in files:
        raise CryptoError("export: no x25519 HPKE key")
    folder = cfg.node.state_dir / "peers" / name
    if folder.exists():
        held = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        if held != files:
            raise CryptoError(
                f"{folder}: holds other material for peer {name}; remove it to replace it"
            )
    folder.mkdir(parents=True, exist_ok=True)
    for fname, data in files.items():
        tmp = folder / f".{fname}.{secrets.token_hex(8)}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / fname)
    snippet = f"[[peers]]\nname = {json.dumps(name)}\nurl = {json.dumps(url)}\n"
    return folder, snippet
