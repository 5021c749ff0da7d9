"""FAULTS F14: certificate problems on DICOM TLS, both ways.

Clients to the node's TLS listener (a Python TLS client that presents any certificate, even
one its own OpenSSL would refuse): an expired certificate, a revoked one (``dicom.tls.crl_file``),
an RSA-1024 key (refused by policy, security level 2) and another CA's are refused at the
handshake and audited as security events naming the check that failed; the node keeps serving.

The peer channel (two nodes, A sending to B): B serving an expired certificate or one without
the address A connects to, then A presenting an expired one: refused at the handshake,
audited on the side that refused, the package stays queued; once both are fixed it goes.

The node to TLS destinations (DCMTK storescp): a server certificate that is expired, from
another CA, without the destination's name, revoked (the destination's ``crl_file``) or with
an RSA-1024 key is refused at the handshake; each delivery stays queued (retry, never
delivered nor dead), a security event is audited per attempt, and once the destination
serves a good certificate every delivery goes through.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.crypto.tls import ca_init
from tests.e2e.test_forward import storescu
from tests.e2e.test_peer import _count, _nodes, _study, _trust
from tests.support.certs import IssuedCert, crl, issue
from tests.support.datasets import make_ct_study
from tests.support.node import GatewayNode
from tests.support.peers import StoreSCP, dcmtk

PAST = datetime.now(UTC) - timedelta(days=400)


@dataclass(frozen=True)
class Pki:
    ca_dir: Path
    ca: Path
    node: IssuedCert
    good: IssuedCert
    expired: IssuedCert
    revoked: IssuedCert
    weak: IssuedCert
    rogue: IssuedCert
    wrong_name: IssuedCert
    crl: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("f14-pki")
    ca_init(root / "ca")
    ca_init(root / "other-ca", name="another CA")
    ca = root / "ca"
    revoked = issue(ca, "revoked", root / "certs")
    return Pki(
        ca_dir=ca,
        ca=ca / "ca.crt",
        node=issue(ca, "gateway-node", root / "certs"),
        good=issue(ca, "good", root / "certs"),
        expired=issue(
            ca, "expired", root / "certs", not_before=PAST, not_after=PAST + timedelta(days=30)
        ),
        revoked=revoked,
        weak=issue(ca, "weak", root / "certs", key="rsa1024"),
        rogue=issue(root / "other-ca", "rogue", root / "certs"),
        wrong_name=issue(ca, "elsewhere", root / "certs", sans=("elsewhere.example",)),
        crl=crl(ca, [revoked], root / "ca.crl"),
    )


def security(node: GatewayNode) -> list[dict[str, Any]]:
    return list(node.cli_json("audit", "list", "--type", "security", "--limit", "1000"))


# --- clients to our TLS listener ------------------------------------------------------------


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[GatewayNode]:
    node = GatewayNode(
        tmp_path_factory.mktemp("f14-listener"),
        dicom={
            "tls": {
                "enabled": True,
                "cert_file": str(pki.node.cert_file),
                "key_file": str(pki.node.key_file),
                "ca_file": str(pki.ca),
                "crl_file": str(pki.crl),
                "handshake_timeout": 3,
            }
        },
        worker={"enabled": False},
    )
    with node:
        yield node


def handshake(node: GatewayNode, pki: Pki, cert: IssuedCert) -> str:
    """Connect with ``cert`` and read; "" when the server kept the connection (accepted),
    else what ended it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # present even what our policy refuses
    ctx.load_verify_locations(cafile=pki.ca)
    ctx.load_cert_chain(cert.cert_file, cert.key_file)
    assert node.tls_port is not None
    with (
        socket.create_connection(("127.0.0.1", node.tls_port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.settimeout(1.5)
        try:
            data = tls.recv(1)
        except TimeoutError:
            return ""  # the server waits for an A-ASSOCIATE-RQ: the handshake was accepted
        except (ssl.SSLError, ConnectionError) as exc:
            return f"refused: {exc}"
        return "refused: closed" if not data else ""


def canary(node: GatewayNode, pki: Pki) -> None:
    args = ["+tls", str(pki.good.key_file), str(pki.good.cert_file), "+cf", str(pki.ca)]
    assert node.tls_port is not None
    proc = dcmtk(
        "echoscu",
        "-aet",
        "MODALITY",
        "-aec",
        node.ae_title,
        *args,
        "127.0.0.1",
        str(node.tls_port),
        timeout=20,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("which", "check"),
    [
        ("expired", "expired"),
        ("revoked", "revoked"),
        ("weak", "too weak"),
        ("rogue", "local issuer"),
    ],
)
def test_client_certificate_problems_are_refused_and_audited(
    listener: GatewayNode, pki: Pki, which: str, check: str
) -> None:
    assert handshake(listener, pki, pki.good) == ""
    before = len(security(listener))
    outcome = handshake(listener, pki, getattr(pki, which))
    assert outcome.startswith("refused"), f"{which} certificate accepted"
    rows = security(listener)[before:]
    assert rows, listener.log()
    assert {r["detail"]["reason"] for r in rows} == {"tls-handshake-failed"}
    errors = " ".join(r["detail"].get("error", "") for r in rows)
    assert check in errors, errors
    canary(listener, pki)


# --- the node to TLS destinations -----------------------------------------------------------


def scp_args(pki: Pki, cert: IssuedCert) -> list[str]:
    return ["+tls", str(cert.key_file), str(cert.cert_file), "+cf", str(pki.ca)]


def test_destination_certificate_problems_keep_the_delivery_queued(
    tmp_path: Path, pki: Pki
) -> None:
    bad = {
        "expired": pki.expired,
        "other-ca": pki.rogue,
        "wrong-name": pki.wrong_name,
        "revoked": pki.revoked,
        "weak-key": pki.weak,
    }
    checks = {
        "expired": "expired",
        "other-ca": "local issuer",
        "wrong-name": "mismatch",
        "revoked": "revoked",
        "weak-key": "too weak",
    }
    scps = {
        name: StoreSCP(tmp_path / f"scp-{name}", aet="PACS", tls=scp_args(pki, cert)).start()
        for name, cert in bad.items()
    }
    try:
        tls = {
            "ca_file": str(pki.ca),
            "cert_file": str(pki.node.cert_file),
            "key_file": str(pki.node.key_file),
            "crl_file": str(pki.crl),
        }
        node = GatewayNode(
            tmp_path / "node",
            destinations=[
                {"name": name, "ae_title": "PACS", "port": scp.port, "tls": tls}
                for name, scp in scps.items()
            ],
            routes=[{"name": "all", "destinations": list(bad), "mode": "stream"}],
            worker={"max_attempts": 100, "backoff_initial": 0.5, "backoff_max": 1},
        )
        files = make_ct_study(tmp_path / "study", 2, seed=14)
        with node:
            storescu(node, files)
            # every attempt is refused at the handshake: retried, never delivered nor dead
            node.wait_for_deliveries("retry_wait", len(bad), timeout=60)
            for _ in range(40):
                rows = security(node)
                refused = {r["detail"].get("destination") for r in rows}
                if refused >= set(bad):
                    break
                time.sleep(0.5)
            assert refused >= set(bad), rows
            for name, check in checks.items():
                errors = [
                    r["detail"]["error"]
                    for r in rows
                    if r["detail"].get("destination") == name
                    and r["detail"]["reason"] == "tls-destination-refused"
                ]
                assert errors and all(check in e for e in errors), (name, errors)
            states = {d["destination"]: d["state"] for d in node.deliveries()}
            assert set(states.values()) <= {"retry_wait", "in_progress", "pending"}, states
            for scp in scps.values():
                assert scp.files() == [], "an instance reached a refused destination"
            assert "tls-destination-refused" in node.metrics()
            # the certificates are fixed: each destination now goes through
            for name, scp in scps.items():
                scp.stop()
                scps[name] = StoreSCP(
                    tmp_path / f"scp-{name}-fixed",
                    aet="PACS",
                    port=scp.port,
                    tls=scp_args(pki, pki.good),
                ).start()
            node.wait_for_deliveries("delivered", len(bad), timeout=60)
            for scp in scps.values():
                assert len(scp.wait_for_files(2, timeout=30)) == 2
            assert node.cli("audit", "verify").returncode == 0
    finally:
        for scp in scps.values():
            scp.stop()


# --- the peer channel -------------------------------------------------------------------------


def _retls(node: GatewayNode, pki: Pki, **kwargs: Any) -> None:
    """Give ``node`` a new TLS key and certificate (``issue``'s arguments)."""
    keys = node.state_dir / "keys"
    cert = issue(pki.ca_dir, node.node_name, node.root / "new-tls", **kwargs)
    cert.cert_file.replace(keys / "tls.crt")
    cert.key_file.replace(keys / "tls.key")


def _retrust(giver: GatewayNode, taker: GatewayNode) -> None:
    """``taker`` pins ``giver``'s current certificate (the old material removed first)."""
    shutil.rmtree(taker.state_dir / "peers" / giver.node_name, ignore_errors=True)
    _trust(giver, taker)


def _new_security_rows(
    node: GatewayNode, seen: int, reason: str, error: str = "", timeout: float = 30
) -> list[Any]:
    """Security rows after ``seen`` with ``reason`` (and ``error`` in their error text):
    rows of an earlier phase's retries can still be written after it ended."""
    deadline = time.monotonic() + timeout
    while True:
        rows = [
            r
            for r in security(node)
            if r["seq"] > seen
            and r["detail"]["reason"] == reason
            and error in str(r["detail"].get("error", ""))
        ]
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def _queued(node: GatewayNode) -> None:
    states = {d["state"] for d in node.deliveries()}
    assert states and states <= {"retry_wait", "in_progress", "pending"}, states


def test_peer_certificate_problems_keep_the_package_queued(tmp_path: Path, pki: Pki) -> None:
    """The peer channel pins each peer's exact certificate (no CRL there: revoking a peer is
    replacing or removing its material); what it must still refuse is checked here."""
    nodes_pki: Any = SimpleNamespace(ca=pki.ca_dir)  # keys init --ca: the node's first identity
    a, b, _ = _nodes(tmp_path, nodes_pki, None, a_worker={"max_attempts": 100, "backoff_max": 1})
    files = _study(tmp_path, 2)
    # 1. B serves an expired certificate (the very one A pins): A refuses it
    _retls(b, pki, not_before=PAST, not_after=PAST + timedelta(days=30))
    _retrust(b, a)
    with a, b:
        storescu(a, files)
        rows = _new_security_rows(a, 0, "tls-destination-refused")
        assert rows and "expired" in rows[-1]["detail"]["error"], rows
        a.wait_for_deliveries("retry_wait", 1)
        seen_a = rows[-1]["seq"]
    # 2. B's certificate does not name the address A connects to
    _retls(b, pki, sans=("elsewhere.example",))
    _retrust(b, a)
    with a, b:
        rows = _new_security_rows(a, seen_a, "tls-destination-refused", "mismatch")
        assert rows, security(a)[-3:]
        _queued(a)
    # 3. B is fixed; A presents an expired certificate (the one B pins): B refuses it
    _retls(b, pki)
    _retrust(b, a)
    _retls(a, pki, not_before=PAST, not_after=PAST + timedelta(days=30))
    _retrust(a, b)
    with a, b:
        rows = _new_security_rows(b, 0, "tls-handshake-failed", "expired")
        assert rows, security(b)[-3:]
        _queued(a)
        assert b.cli_json("audit", "list", "--type", "peer-package", "--limit", "10") == []
    # 4. A is fixed: the package goes, once
    _retls(a, pki)
    _retrust(a, b)
    with a, b:
        a.wait_for_deliveries("delivered", 1, timeout=60)
        assert a.cli("audit", "verify").returncode == 0
        assert b.cli("audit", "verify").returncode == 0
    assert _count(b, "select count(*) from instances") == 2
