"""DICOM TLS with DCMTK on loopback: the node's TLS listener, its SCU over TLS, refusals.

The CA, node and client certificates are made per run (ECDSA P-256, which DCMTK reads).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.crypto.tls import IssuedCertificate, ca_init, ca_issue
from tests.support.datasets import make_ct_study, sop_instance_uids
from tests.support.node import GatewayNode
from tests.support.peers import StoreSCP, dcmtk


@dataclass(frozen=True)
class Pki:
    ca: Path
    node: IssuedCertificate
    modality: IssuedCertificate
    storescp: IssuedCertificate
    rogue: IssuedCertificate  # from another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def make_pki(root: Path) -> Pki:
    """A CA, another CA, and certificates for the node, a modality, storescp and a rogue."""
    ca_init(root / "ca")
    ca_init(root / "other-ca", name="another CA")
    return Pki(
        ca=root / "ca" / "ca.crt",
        node=ca_issue(root / "ca", "gateway-node", root / "node"),
        modality=ca_issue(root / "ca", "modality", root / "modality"),
        storescp=ca_issue(root / "ca", "storescp", root / "storescp"),
        rogue=ca_issue(root / "other-ca", "modality", root / "rogue"),
    )


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[GatewayNode]:
    """A node with plain and TLS listeners; MODALITY is bound to the certificate CN modality."""
    gateway = GatewayNode(
        tmp_path_factory.mktemp("tls-node"), dicom=tls_listener(pki), worker={"enabled": False}
    )
    with gateway:
        yield gateway


def tls_listener(pki: Pki) -> dict[str, Any]:
    """``[dicom]`` settings: plain and TLS listeners, the node's certificate, client
    certificates of the CA required, MODALITY bound to the certificate CN modality."""
    return {
        "tls": {
            "enabled": True,
            "cert_file": str(pki.node.cert_file),
            "key_file": str(pki.node.key_file),
            "ca_file": str(pki.ca),
            "handshake_timeout": 3,
        },
        "tls_bindings": [{"calling_ae": "MODALITY", "certificate_name": "modality"}],
    }


def tls_args(cert: IssuedCertificate | None, ca: Path) -> list[str]:
    """DCMTK 3.6.7: +tls KEY CERT (or +tla: no certificate), +cf CA to verify the node."""
    if cert is None:
        return ["+tla", "+cf", str(ca)]
    return ["+tls", str(cert.key_file), str(cert.cert_file), "+cf", str(ca)]


def echo(node: GatewayNode, *tls: str, aet: str = "MODALITY", port: int | None = None) -> Any:
    return dcmtk(
        "echoscu",
        "-to",
        "5",
        "-aet",
        aet,
        "-aec",
        node.ae_title,
        *tls,
        "127.0.0.1",
        str(port or node.tls_port),
        timeout=20,
    )


def audit(node: GatewayNode, event_type: str) -> list[dict[str, Any]]:
    return list(node.cli_json("audit", "list", "--type", event_type, "--limit", "10000"))


def test_echo_and_store_over_tls_with_a_client_certificate(
    node: GatewayNode, pki: Pki, tmp_path: Path
) -> None:
    proc = echo(node, *tls_args(pki.modality, pki.ca))
    assert proc.returncode == 0, proc.stderr
    files = make_ct_study(tmp_path / "study", 3, seed=11)
    proc = dcmtk(
        "storescu",
        "-aet",
        "MODALITY",
        "-aec",
        node.ae_title,
        *tls_args(pki.modality, pki.ca),
        "127.0.0.1",
        str(node.tls_port),
        *[str(f) for f in files],
    )
    assert proc.returncode == 0, proc.stderr
    stored = {r["sop_instance_uid"] for r in audit(node, "c-store") if r["outcome"] == "success"}
    assert set(sop_instance_uids(files)) <= stored


@pytest.mark.parametrize("who", ["other-ca", "no-certificate"])
def test_client_certificate_refused(node: GatewayNode, pki: Pki, who: str) -> None:
    before = len(audit(node, "security"))
    cert = pki.rogue if who == "other-ca" else None
    proc = echo(node, *tls_args(cert, pki.ca))
    assert proc.returncode != 0
    rows = audit(node, "security")[before:]
    assert rows, node.log()
    assert {r["detail"]["reason"] for r in rows} == {"tls-handshake-failed"}
    assert {r["outcome"] for r in rows} == {"failure"}
    assert echo(node, *tls_args(pki.modality, pki.ca)).returncode == 0  # still serving


def test_plaintext_to_the_tls_port_and_tls_to_the_plain_port(node: GatewayNode, pki: Pki) -> None:
    before = len(audit(node, "security"))
    assert echo(node).returncode != 0  # a plain A-ASSOCIATE-RQ to the TLS port
    rows = audit(node, "security")[before:]
    assert [r["detail"]["reason"] for r in rows] == ["tls-handshake-failed"]
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.modality.cert_file), str(pki.modality.key_file))
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as raw:
        with pytest.raises(OSError):  # a ClientHello to the plain port: aborted, closed
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.recv(1)
    assert echo(node, port=node.port, aet="PLAIN").returncode == 0
    assert echo(node, *tls_args(pki.modality, pki.ca)).returncode == 0


def test_idle_connections_do_not_stall_the_tls_listener(node: GatewayNode, pki: Pki) -> None:
    assert node.tls_port is not None
    idle = [socket.create_connection(("127.0.0.1", node.tls_port)) for _ in range(20)]
    try:
        time.sleep(0.3)  # all accepted and waiting in their handshakes
        started = time.monotonic()
        proc = echo(node, *tls_args(pki.modality, pki.ca))
        assert proc.returncode == 0, proc.stderr
        assert time.monotonic() - started < 3
        for s in idle:  # each closed at its 3 s handshake deadline
            s.settimeout(10)
            assert s.recv(1) == b""
    finally:
        for s in idle:
            s.close()
    reasons = [r["detail"].get("error") for r in audit(node, "security")]
    assert reasons.count("timeout") >= 20


def test_calling_ae_bound_to_a_certificate(node: GatewayNode, pki: Pki) -> None:
    before = len(audit(node, "association"))
    # the certificate of "modality" calling as another AE title
    assert echo(node, *tls_args(pki.modality, pki.ca), aet="OTHER").returncode != 0
    # MODALITY without its certificate (plain port)
    assert echo(node, port=node.port, aet="MODALITY").returncode != 0
    rows = [r for r in audit(node, "association")[before:] if r["outcome"] == "rejected"]
    assert [(r["calling_ae_title"], r["detail"]["reason"]) for r in rows] == [
        ("OTHER", "certificate-ae-mismatch"),
        ("MODALITY", "certificate-ae-mismatch"),
    ]


def test_node_sends_over_tls_to_storescp(tmp_path: Path, pki: Pki) -> None:
    scp_tls = ["+tls", str(pki.storescp.key_file), str(pki.storescp.cert_file), "+cf", str(pki.ca)]
    good_pin = pki.storescp.public_key_sha256
    with StoreSCP(tmp_path / "received", tls=scp_tls) as scp:
        tls = {
            "ca_file": str(pki.ca),
            "cert_file": str(pki.node.cert_file),
            "key_file": str(pki.node.key_file),
        }
        destinations = [
            {
                "name": "scp",
                "ae_title": scp.aet,
                "port": scp.port,
                "tls": {**tls, "pin_sha256": good_pin},
            },
            {
                "name": "wrong-pin",
                "ae_title": scp.aet,
                "port": scp.port,
                "tls": {**tls, "pin_sha256": "0" * 64},
            },
            {
                "name": "wrong-name",
                "ae_title": scp.aet,
                "port": scp.port,
                "tls": {**tls, "server_name": "pacs.example"},
            },
        ]
        gateway = GatewayNode(
            tmp_path / "node",
            destinations=destinations,
            routes=[
                {
                    "name": "all",
                    "destinations": ["scp", "wrong-pin", "wrong-name"],
                    "quiet_seconds": 0.5,
                }
            ],
            worker={"max_attempts": 1},
        )
        files = make_ct_study(tmp_path / "study", 2, seed=12)
        with gateway:
            proc = dcmtk(
                "storescu",
                "-aet",
                "MODALITY",
                "-aec",
                gateway.ae_title,
                "127.0.0.1",
                str(gateway.port),
                *[str(f) for f in files],
            )
            assert proc.returncode == 0, proc.stderr
            delivered = gateway.wait_for_deliveries("delivered", 1, timeout=30)
            assert [d["destination"] for d in delivered] == ["scp"]
            failed = gateway.wait_for_deliveries("failed", 2, timeout=30)
            assert {d["destination"] for d in failed} == {"wrong-pin", "wrong-name"}
            scp.wait_for_files(2)
        errors = {d["destination"]: d["last_error"] for d in failed}
        assert "pin" in errors["wrong-pin"]
        assert "TLS" in errors["wrong-name"]


def test_keys_init_makes_a_tls_identity_the_node_serves_with(tmp_path: Path, pki: Pki) -> None:
    gateway = GatewayNode(
        tmp_path / "node",
        dicom={"tls": {"enabled": True, "require_client_cert": False}},
        worker={"enabled": False},
    )
    proc = gateway.cli("keys", "init", check=True)
    assert "PRIVATE" not in proc.stdout and "TLS public key sha256" in proc.stdout
    key, cert = gateway.state_dir / "keys" / "tls.key", gateway.state_dir / "keys" / "tls.crt"
    assert key.stat().st_mode & 0o777 == 0o600 and cert.stat().st_mode & 0o777 == 0o600
    assert "existing" in gateway.cli("keys", "init", check=True).stdout  # creates nothing new
    with gateway:
        # no client certificate required; the self-signed node certificate is the trust anchor
        assert echo(gateway, "+tla", "+cf", str(cert), aet="ANY").returncode == 0
        assert echo(gateway, *tls_args(None, pki.ca), aet="ANY").returncode != 0
