"""``dicom-gateway peers``: exchange what nodes need to trust each other.

``peers export`` prints this node's public material as JSON (name, peer endpoint URL, TLS
certificate, HPKE and signing public keys, their SHA-256 fingerprints); ``peers add`` checks
such a file and stores it under ``<state_dir>/peers/<name>/``, then prints the ``[[peers]]``
entry to paste into the configuration (the configuration names peers; the files hold keys).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig
from gateway.errors import CryptoError
from gateway.peer.material import add_peer, export_material


def add_parsers(sub: Any, with_config: Callable[[Any], Any]) -> None:
    peers = sub.add_parser("peers", help="peer nodes: export this node's material, add a peer's")
    psub = peers.add_subparsers(dest="action", required=True)
    with_config(psub.add_parser("export", help="print this node's public material (JSON)"))
    add = with_config(psub.add_parser("add", help="store a peer's exported material"))
    add.add_argument("export_file", metavar="EXPORT.json", help="what the peer's export printed")


def run_peers(cfg: GatewayConfig, args: argparse.Namespace) -> int:
    """Raises CryptoError (the caller prints it) when material is missing or inconsistent."""
    if args.action == "export":
        print(json.dumps(export_material(cfg), indent=2, sort_keys=True))
        return 0
    try:
        export = json.loads(Path(args.export_file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CryptoError(f"{args.export_file}: not a readable JSON export") from exc
    if not isinstance(export, dict):
        raise CryptoError(f"{args.export_file}: not a peer export")
    folder, snippet = add_peer(cfg, export)
    print(f"stored peer {export['name']} in {folder}", file=sys.stderr)
    print(f"  TLS certificate sha256  {export['tls_certificate_sha256']}", file=sys.stderr)
    print(f"  signing key sha256      {export['signing_public_key_sha256']}", file=sys.stderr)
    print(
        'add this entry to the configuration (and a destination with type = "peer"):',
        file=sys.stderr,
    )
    print(snippet, end="")
    return 0
