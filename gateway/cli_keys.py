"""``dicom-gateway keys`` and ``dicom-gateway ca``: a node's key material and a deployment CA.

Only paths and fingerprints are printed (SHA-256, hex); key bytes never reach argv, stdout
or logs. See :mod:`gateway.crypto.keys` and :mod:`gateway.crypto.tls`.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.config import GatewayConfig
from gateway.crypto import keys as node_keys
from gateway.crypto import tls
from gateway.errors import CryptoError

_KEY_TYPES = ("ecdsa-p256", "ed25519")


def add_parsers(sub: Any, with_config: Callable[[Any], Any]) -> None:
    """Add the ``keys`` and ``ca`` subcommands to the main parser's subparsers."""
    keys = sub.add_parser("keys", help="the node's key material: init, rotate")
    ksub = keys.add_subparsers(dest="action", required=True)
    ki = with_config(
        ksub.add_parser("init", help="create missing keys (TLS, HPKE, signing, spool KEK)")
    )
    ki.add_argument(
        "--ca",
        metavar="DIR",
        help="issue the TLS certificate from this deployment CA (default: self-signed)",
    )
    ki.add_argument("--key-type", choices=_KEY_TYPES, default="ecdsa-p256")
    ki.add_argument("--no-hybrid", action="store_true", help="no ML-KEM-768+X25519 HPKE key")
    with_config(ksub.add_parser("rotate", help="new spool key-encryption key; rewrap the spool"))

    ca = sub.add_parser("ca", help="a small deployment CA: init, issue")
    csub = ca.add_subparsers(dest="action", required=True)
    cinit = csub.add_parser("init", help="create a CA (ca.key 0600, ca.crt) in DIR")
    cinit.add_argument("ca_dir", metavar="DIR")
    cinit.add_argument("--key-type", choices=_KEY_TYPES, default="ecdsa-p256")
    cinit.add_argument("--name", default="dicom-gateway deployment CA", help="subject CN")
    cissue = csub.add_parser("issue", help="issue a node certificate (server and client)")
    cissue.add_argument("ca_dir", metavar="DIR")
    cissue.add_argument("node", metavar="NODE", help="lowercase DNS name: CN and SAN")
    cissue.add_argument("--out", required=True, metavar="DIR", help="writes NODE.key/.crt, ca.crt")
    cissue.add_argument("--key-type", choices=_KEY_TYPES, default="ecdsa-p256")


def run_ca(args: argparse.Namespace) -> int:
    try:
        if args.action == "init":
            cert_path = tls.ca_init(Path(args.ca_dir), name=args.name, key_type=args.key_type)
            print(f"CA certificate  {cert_path}")
            print(f"  certificate sha256  {_cert_fingerprints(cert_path)[0]}")
            return 0
        issued = tls.ca_issue(Path(args.ca_dir), args.node, Path(args.out), key_type=args.key_type)
    except CryptoError as exc:
        print(f"dicom-gateway: {exc}", file=sys.stderr)
        return 1
    print(f"key          {issued.key_file} (0600)")
    print(f"certificate  {issued.cert_file}")
    print(f"CA           {issued.ca_file}")
    print(f"  certificate sha256  {issued.certificate_sha256}")
    print(f"  public key sha256   {issued.public_key_sha256}  (pin_sha256)")
    return 0


def run_keys(cfg: GatewayConfig, args: argparse.Namespace) -> int:
    """Raises CryptoError (the caller prints it) when key material is unsafe or unusable."""
    if args.action == "rotate":
        keyring = node_keys.rotate(cfg.state_dir)
        rewrapped = _rewrap_spool(cfg.spool_dir, keyring)
        print(f"current key-encryption key: {keyring.current.key_id}")
        print(f"rewrapped {rewrapped} spool file(s)")
        return 0
    result = node_keys.init_node_keys(cfg.state_dir, hybrid=not args.no_hybrid)
    for name in result.created:
        print(f"created   {node_keys.keys_dir(cfg.state_dir) / name}")
    for name in result.existing:
        print(f"existing  {node_keys.keys_dir(cfg.state_dir) / name}")
    cert_file, key_file = cfg.tls_cert_file, cfg.tls_key_file
    if cert_file.exists() and key_file.exists():
        print(f"existing  {key_file}")
        print(f"existing  {cert_file}")
    else:
        if key_file.exists() or cert_file.exists():
            raise CryptoError(f"{key_file}, {cert_file}: one exists without the other")
        key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tls.issue_node_certificate(
            cfg.node.name.lower(),
            cert_file=cert_file,
            key_file=key_file,
            ca_dir=Path(args.ca) if args.ca else None,
            key_type=args.key_type,
        )
        cert_file.chmod(0o600)
        how = f"issued by {args.ca}" if args.ca else "self-signed"
        print(f"created   {key_file} (0600)")
        print(f"created   {cert_file} ({how})")
    cert_sha, spki_sha = _cert_fingerprints(cert_file)
    print(f"TLS certificate sha256  {cert_sha}")
    print(f"TLS public key sha256   {spki_sha}  (a peer's pin_sha256)")
    signing = node_keys.load_signing_key(cfg.state_dir).public_key()
    raw = signing.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    print(f"signing key (Ed25519) sha256  {hashlib.sha256(raw).hexdigest()}")
    hpke = node_keys.load_hpke_key(cfg.state_dir).public_key()
    raw = hpke.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    print(f"HPKE key (X25519) sha256      {hashlib.sha256(raw).hexdigest()}")
    return 0


def _cert_fingerprints(path: Path) -> tuple[str, str]:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CryptoError(f"{path}: cannot read the certificate") from exc
    return tls.certificate_sha256(cert), tls.public_key_sha256(cert)


def _rewrap_spool(spool_dir: Path, keyring: node_keys.Keyring) -> int:
    """Rewrap the KEK-wrapped envelopes in the spool under the current key (headers only)."""
    from gateway.crypto.envelope import MAGIC
    from gateway.crypto.kek import WrapScheme

    count = 0
    if not spool_dir.is_dir():
        return 0
    for path in sorted(p for p in spool_dir.rglob("*") if p.is_file()):
        with path.open("rb") as f:
            head = f.read(20)
        if head[: len(MAGIC)] != MAGIC or len(head) < 20 or head[19] != WrapScheme.KEK_AES256GCM:
            continue
        count += node_keys.rewrap(path, keyring)
    return count
