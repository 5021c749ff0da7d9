"""Peer transfer between real nodes on loopback: storescu -> A (basic profile) -> B -> Orthanc.

Keys come from ``keys init`` and a deployment CA from ``ca init`` per run; nodes trust each
other through ``peers export`` / ``peers add``. Refusals are driven by a small HTTPS client
that crafts packages with a node's own keys.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import socket
import sqlite3
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest

from gateway.crypto import keys as node_keys
from gateway.crypto.seal import (
    HpkeSuite,
    Manifest,
    RecipientKey,
    seal_instance,
    sign_manifest,
)
from gateway.crypto.tls import IssuedCertificate, ca_init, ca_issue, client_context
from tests.e2e.test_forward import orthanc_destination, storescu
from tests.support.datasets import make_ct_study
from tests.support.node import GatewayNode
from tests.support.peers import Orthanc, free_port

PATIENT_NAME = "Nakamura^Hiroshi"
PATIENT_ID = "PID-PEER-4711"


@dataclass(frozen=True)
class Pki:
    ca: Path
    stranger: IssuedCertificate  # same CA, but no peer's certificate
    rogue: IssuedCertificate  # another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("peer-pki")
    ca_init(root / "ca")
    ca_init(root / "other-ca", name="another CA")
    return Pki(
        ca=root / "ca",
        stranger=ca_issue(root / "ca", "stranger", root / "stranger"),
        rogue=ca_issue(root / "other-ca", "node-a", root / "rogue"),
    )


def _study(tmp_path: Path, n: int, rows: int = 64) -> list[Path]:
    return make_ct_study(
        tmp_path / "study",
        n,
        seed=5,
        rows=rows,
        cols=rows,
        patient_id=PATIENT_ID,
        patient_name=PATIENT_NAME,
        AccessionNumber="ACC-PEER-1",
    )


def _trust(giver: GatewayNode, taker: GatewayNode) -> None:
    export = giver.cli("peers", "export", check=True).stdout
    path = taker.root / f"{giver.root.name}.export.json"
    path.write_text(export)
    proc = taker.cli("peers", "add", str(path), check=True)
    assert "[[peers]]" in proc.stdout


def _nodes(
    tmp_path: Path,
    pki: Pki,
    orthanc: Orthanc | None,
    *,
    third: bool = False,
    a_worker: dict[str, Any] | None = None,
    b_peer: dict[str, Any] | None = None,
) -> tuple[GatewayNode, GatewayNode, GatewayNode | None]:
    b_port, c_port, a_port = free_port(), free_port(), free_port()
    url = "https://127.0.0.1:{}".format
    secret = tmp_path / "project.secret"
    secret.write_text("a-project-secret-for-peer-tests-0123456789abcdef\n")
    secret.chmod(0o600)
    b_peers = [{"name": "node-a", "url": url(a_port)}]
    if third:
        b_peers.append({"name": "node-c", "url": url(c_port)})
    b = GatewayNode(
        tmp_path / "b",
        name="node-b",
        ae_title="NODEB",
        peer={"port": b_port, **(b_peer or {})},
        peers=b_peers,
        destinations=[orthanc_destination(orthanc)] if orthanc else [],
        routes=(
            [{"name": "to-pacs", "destinations": ["pacs"], "quiet_seconds": 0.5}] if orthanc else []
        ),
        # killed in a test, B may have claimed its delivery to Orthanc already: its lease
        # must run out within the test's wait (the default is 120 s), as A's does
        worker={"lease_seconds": 3},
    )
    a = GatewayNode(
        tmp_path / "a",
        name="node-a",
        ae_title="NODEA",
        peer={"port": a_port, "enabled": False},
        peers=[{"name": "node-b", "url": url(b_port), "timeout": 10}],
        destinations=[{"name": "b", "type": "peer", "peer": "node-b"}],
        routes=[{"name": "to-b", "destinations": ["b"], "quiet_seconds": 0.5, "profile": "basic"}],
        deid={"secret_file": str(secret)},
        worker={"lease_seconds": 3, **(a_worker or {})},
    )
    c = None
    if third:
        c = GatewayNode(
            tmp_path / "c",
            name="node-c",
            ae_title="NODEC",
            peer={"port": c_port},
            peers=[{"name": "node-a", "url": url(a_port)}, {"name": "node-b", "url": url(b_port)}],
        )
    for node in (n for n in (a, b, c) if n is not None):
        node.cli("keys", "init", "--ca", str(pki.ca), check=True)
    _trust(b, a)
    _trust(a, b)
    if c is not None:
        _trust(a, c)
        _trust(b, c)
        _trust(c, b)
    return a, b, c


def _count(node: GatewayNode, sql: str) -> int:
    with sqlite3.connect(node.state_dir / "index.sqlite3") as conn:
        return int(conn.execute(sql).fetchone()[0])


def _security(node: GatewayNode) -> list[dict[str, Any]]:
    return list(node.cli_json("audit", "list", "--type", "security"))


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# --- a client that crafts packages -------------------------------------------------------------


class Client:
    """HTTPS to a peer endpoint with a given client certificate (a node's, by default)."""

    def __init__(
        self,
        sender: GatewayNode,
        server: GatewayNode,
        *,
        cert: IssuedCertificate | None = None,
    ) -> None:
        assert server.peer_port is not None
        self.port = server.peer_port
        keys = sender.state_dir / "keys"
        cert_file = cert.cert_file if cert else keys / "tls.crt"
        key_file = cert.key_file if cert else keys / "tls.key"
        self.ctx = client_context(
            ca_file=server.state_dir / "keys" / "tls.crt", cert_file=cert_file, key_file=key_file
        )
        self.ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN

    def call(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=30)
        try:
            conn.request(method, f"/peer/v1/packages/{path}", body=body)
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            conn.close()


def _package(
    sender: GatewayNode, recipient: GatewayNode, package_id: str, files: list[Path]
) -> tuple[bytes, list[bytes]]:
    """A package as node ``sender`` makes one, sealed for ``recipient``."""
    hpke = node_keys.load_hpke_key(recipient.state_dir).public_key()
    key = RecipientKey.from_x25519(hpke)
    sealed, entries = [], []
    for i, f in enumerate(files):
        out = io.BytesIO()
        with f.open("rb") as src:
            entries.append(seal_instance(src, out, key, package_id=package_id, index=i))
        sealed.append(out.getvalue())
    manifest = Manifest(
        package_id=package_id,
        sender=sender.node_name,
        recipient=recipient.node_name,
        instances=tuple(entries),
        profile_name="",
        profile_sha256="0" * 64,
        created=datetime.now(UTC),
        trace_id="test",
        hpke_suite=HpkeSuite.X25519,
    )
    document = sign_manifest(manifest, node_keys.load_signing_key(sender.state_dir))
    return document, sealed


def _send(client: Client, package_id: str, document: bytes, sealed: list[bytes]) -> Any:
    status, body = client.call("PUT", f"{package_id}/manifest", document)
    if status != 200 or body.get("state") == "complete":
        return status, body
    for i, data in enumerate(sealed):
        status, body = client.call("PUT", f"{package_id}/instances/{i}", data)
        if status != 200:
            return status, body
    return client.call("POST", f"{package_id}/commit")


# --- tests -------------------------------------------------------------------------------------


def _staged(node: GatewayNode) -> int:
    return sum(1 for _ in (node.state_dir / "peer-staging").glob("*/*.dcm"))


def test_study_goes_sealed_from_a_through_b_to_orthanc_across_kills(
    tmp_path: Path, pki: Pki, orthanc: Orthanc
) -> None:
    """SIGKILL A mid-transfer and B with the package staged (mid-ingest): after restarts the
    transfer resumes and B holds every instance exactly once; Orthanc gets the study."""
    n = 40
    files = _study(tmp_path, n, rows=384)
    a, b, _ = _nodes(tmp_path, pki, orthanc)
    with b, a:
        storescu(a, files)
        _wait(lambda: _staged(b) >= 1, 60, "the first instances to reach B")
        a.kill()  # mid-transfer
        partial = _staged(b)
        a.start()
        _wait(
            lambda: _staged(b) >= n or _count(b, "select count(*) from peer_packages") > 0,
            60,
            "the rest to reach B",
        )
        b.kill()  # with the whole package staged: mid-ingest or just before it
        b.start()
        (done,) = a.wait_for_deliveries("delivered", 1, timeout=60)
        assert done["sent"] == n
        b.wait_for_deliveries("delivered", 1, timeout=60)
        receipts = a.cli_json("audit", "list", "--type", "peer-receipt")
        packages = b.cli_json("audit", "list", "--type", "peer-package")
        assert a.cli("audit", "verify").returncode == 0
        assert b.cli("audit", "verify").returncode == 0
    assert 0 < partial
    assert orthanc.count_instances() == n
    for oid in orthanc.instances()[:5]:
        data = orthanc.instance_file(oid)
        out = pydicom.dcmread(io.BytesIO(data))
        assert out.PatientIdentityRemoved == "YES"
        for marker in (PATIENT_ID, "Nakamura", "ACC-PEER-1"):
            assert marker.encode() not in data
    assert receipts[-1]["delivery_id"] == done["id"]
    assert receipts[-1]["detail"]["package_id"] == done["id"]
    (package,) = packages  # ingested once
    assert package["detail"]["package_id"] == done["id"]
    assert package["detail"]["profile"] == "basic"
    assert package["detail"]["instances"] == n
    assert _count(a, "select count(*) from peer_receipts") == 1
    assert _count(b, "select count(*) from peer_packages") == 1
    assert _count(b, "select count(*) from instances") == n
    assert _count(b, "select count(distinct sop_instance_uid) from instances") == n
    assert not list((b.state_dir / "peer-staging").glob("*/*.dcm"))
    # relays, spools and disks see ciphertext: nothing in either node's spool reads as DICOM
    spooled = [
        path
        for node in (a, b)
        for folder in ("spool", "peer-staging")
        for path in (node.state_dir / folder).rglob("*")
        if path.is_file()
    ]
    assert spooled
    for path in spooled:
        data = path.read_bytes()
        assert b"DICM" not in data, path
        for marker in (PATIENT_ID, "Nakamura", "ACC-PEER-1"):
            assert marker.encode() not in data, path


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def test_refusals_are_audited_and_ingest_nothing(tmp_path: Path, pki: Pki) -> None:
    a, b, c = _nodes(tmp_path, pki, None, third=True)
    assert c is not None
    files = _study(tmp_path, 3)
    with b, c:
        a_to_b, c_to_b, a_to_c = Client(a, b), Client(c, b), Client(a, c)
        document, sealed = _package(a, b, "pkg-1", files)

        # a flipped byte in a sealed instance
        status, body = _send(a_to_b, "pkg-1", document, [sealed[0], _flip(sealed[1], 400)])
        assert (status, body["error"]) == (422, "instance-does-not-verify")
        # a flipped byte in the manifest
        at = document.index(b'"sha256":"') + 12
        status, body = _send(a_to_b, "pkg-1", _flip(document, at), sealed)
        assert (status, body["error"]) == (403, "bad-signature")
        assert _count(b, "select count(*) from instances") == 0

        # the good package, then the same again: one copy, the same receipt
        status, first = _send(a_to_b, "pkg-1", document, sealed)
        assert status == 200 and first["state"] == "complete", first
        status, again = _send(a_to_b, "pkg-1", document, sealed)
        assert status == 200 and again["receipt"] == first["receipt"]
        assert _count(b, "select count(*) from instances") == 3

        # the same package id from another sender
        doc_c, sealed_c = _package(c, b, "pkg-1", files[:1])
        status, body = _send(c_to_b, "pkg-1", doc_c, sealed_c)
        assert (status, body["error"]) == (409, "replayed-package-id")
        # B's package sent to a third node
        status, body = _send(a_to_c, "pkg-1", document, sealed)
        assert (status, body["error"]) == (403, "wrong-recipient")

        # certificates: same CA but no peer's; another CA; and plaintext HTTP
        for cert in (pki.stranger, pki.rogue):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                Client(a, b, cert=cert).call("PUT", "pkg-2/manifest", document)
        assert b.peer_port is not None
        with socket.create_connection(("127.0.0.1", b.peer_port), timeout=10) as plain:
            plain.sendall(b"PUT /peer/v1/packages/pkg-2/manifest HTTP/1.1\r\nHost: b\r\n\r\n")
            plain.settimeout(10)
            try:
                answer = plain.recv(4096)
            except ConnectionError:
                answer = b""
        assert b"HTTP/1.1 200" not in answer

        # still serving: a second package goes through
        document2, sealed2 = _package(a, b, "pkg-2", files[1:])
        status, body = _send(a_to_b, "pkg-2", document2, sealed2)
        assert status == 200 and body["state"] == "complete"
        refused_b = {e["detail"]["reason"] for e in _security(b)}
        handshakes_b = [
            e["detail"]["error"]
            for e in _security(b)
            if e["detail"]["reason"] == "tls-handshake-failed"
        ]
        refused_c = {e["detail"]["reason"] for e in _security(c)}
        assert b.cli("audit", "verify").returncode == 0
        assert c.cli("audit", "verify").returncode == 0
    assert {
        "instance-does-not-verify",
        "bad-signature",
        "replayed-package-id",
        "tls-handshake-failed",
    } <= refused_b
    assert len(handshakes_b) == 3, handshakes_b  # stranger, rogue, plaintext
    assert "wrong-recipient" in refused_c
    # nothing of the refused packages was ingested: 3 + 2 instances, both from node-a
    assert _count(b, "select count(*) from instances") == 3  # pkg-2 repeats pkg-1's bytes
    assert _count(b, "select count(*) from peer_packages where sender = 'node-a'") == 2
    assert _count(b, "select count(*) from peer_packages") == 2
    assert _count(c, "select count(*) from instances") == 0


def test_staging_left_by_a_crash_is_swept_on_start(tmp_path: Path, pki: Pki) -> None:
    """Killed between a package's commit and the removal of its staging folder, B drops that
    folder on its next start; an open package keeps its verified instances for the sender to
    resume and loses only the temporary files a crash left beside them; one nothing was added
    to for ``staging_max_age_seconds`` is removed and audited."""
    a, b, _ = _nodes(tmp_path, pki, None, b_peer={"staging_max_age_seconds": 3600})
    files = _study(tmp_path, 3)
    staging = b.state_dir / "peer-staging"
    with b:
        client = Client(a, b)
        done_doc, done_sealed = _package(a, b, "pkg-done", files)
        status, body = _send(client, "pkg-done", done_doc, done_sealed)
        assert status == 200 and body["state"] == "complete", body
        open_doc, open_sealed = _package(a, b, "pkg-open", files)
        assert client.call("PUT", "pkg-open/manifest", open_doc)[0] == 200
        assert client.call("PUT", "pkg-open/instances/0", open_sealed[0]) == (200, {"held": 0})
        (open_folder,) = [p for p in staging.iterdir() if p.is_dir()]
        (held,) = open_folder.glob("*.dcm")
        b.kill()

    def folder_of(package_id: str) -> Path:
        return staging / hashlib.sha256(f"node-a\0{package_id}".encode()).hexdigest()[:32]

    # what a kill after pkg-done's commit and during pkg-open's next instance leaves behind
    done_folder = folder_of("pkg-done")
    assert done_folder != open_folder == folder_of("pkg-open")
    done_folder.mkdir()
    (done_folder / "manifest.json").write_bytes(done_doc)
    (done_folder / held.name).write_bytes(held.read_bytes())
    os.link(done_folder / held.name, done_folder / ".ingest-0-leftover")
    (open_folder / ".plain-leftover").write_bytes(b"partial")
    (open_folder / ".tmp-leftover").write_bytes(b"partial")
    nameless = staging / ("0" * 32)  # a manifest that never became durable
    nameless.mkdir()
    (nameless / ".tmp-leftover").write_bytes(b"partial")
    # and a package its sender left open two hours ago
    old_doc, _old_sealed = _package(a, b, "pkg-old", files)
    old_folder = folder_of("pkg-old")
    old_folder.mkdir()
    (old_folder / "manifest.json").write_bytes(old_doc)
    (old_folder / held.name).write_bytes(held.read_bytes())
    two_hours_ago = time.time() - 7200
    for path in [*old_folder.iterdir(), old_folder]:
        os.utime(path, (two_hours_ago, two_hours_ago))
    with b:
        assert not done_folder.exists()
        assert not nameless.exists()
        _wait(lambda: not old_folder.exists(), 20, "the abandoned package's staging to go")
        assert sorted(p.name for p in open_folder.iterdir()) == sorted(["manifest.json", held.name])
        status, body = client.call("PUT", "pkg-open/manifest", open_doc)
        assert (status, body["held"]) == (200, [0])
        status, body = _send(client, "pkg-open", open_doc, open_sealed)
        assert status == 200 and body["state"] == "complete", body
        assert list(staging.iterdir()) == []
        (expired,) = b.cli_json("audit", "list", "--type", "peer-staging-expired")
        assert b.cli("audit", "verify").returncode == 0
    assert _count(b, "select count(*) from peer_packages") == 2
    assert expired["calling_ae_title"] == "node-a"
    detail = expired["detail"]
    assert (detail["package_id"], detail["sender"]) == ("pkg-old", "node-a")
    assert (detail["instances"], detail["instances_held"]) == (3, 1)
    assert 7200 <= detail["idle_seconds"] < 7300
    assert "abandoned peer package removed from staging" in b.log(200)
