"""Audit export (F15, A10): a real node sends its audit rows to a syslog-TLS receiver.

The receiver (tests/support/syslog_receiver.py) is an asyncio + ssl server on loopback that
parses RFC 5425 octet-counted frames; it is started, stopped, restarted and made to reset
the connection by the tests. Certificates are made per run by the deployment CA helpers.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from gateway.crypto.tls import IssuedCertificate, ca_init, ca_issue
from tests.support.datasets import DEFAULT_PATIENT_ID, make_ct_study, sop_instance_uids
from tests.support.node import GatewayNode
from tests.support.pdus import associate_rq
from tests.support.peers import dcmtk, free_port
from tests.support.syslog_receiver import SyslogMessage, SyslogTLSReceiver

HOSTILE_AE = "<a>&'\";--%s{}"  # 13 printable characters: a valid AE title
HOSTILE_PATIENT_ID = "ID<1>&'\"\x1b"
HOSTILE_PATIENT_NAME = "Doe^Jöhn\x1b$B\x00<a>&'\";--%s{}\\Other"


@dataclass(frozen=True)
class Pki:
    ca: Path
    node: IssuedCertificate
    repository: IssuedCertificate
    rogue_repository: IssuedCertificate  # from another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("audit-pki")
    ca_init(root / "ca")
    ca_init(root / "other-ca", name="another CA")
    return Pki(
        ca=root / "ca" / "ca.crt",
        node=ca_issue(root / "ca", "gateway-node", root / "node"),
        repository=ca_issue(root / "ca", "audit-repository", root / "repository"),
        rogue_repository=ca_issue(root / "other-ca", "audit-repository", root / "rogue"),
    )


def receiver_for(pki: Pki, *, port: int | None = None, **kwargs: Any) -> SyslogTLSReceiver:
    return SyslogTLSReceiver(
        cert_file=pki.repository.cert_file,
        key_file=pki.repository.key_file,
        client_ca_file=pki.ca,
        port=port,
        **kwargs,
    )


def export_node(
    root: Path, pki: Pki, port: int, *, node_tls_material: bool = False, **export: Any
) -> GatewayNode:
    """A node exporting to 127.0.0.1:``port``. With ``node_tls_material`` its client
    certificate is not configured: the node's own <state_dir>/keys/tls.crt is placed there."""
    client: dict[str, str] = {
        "cert_file": str(pki.node.cert_file),
        "key_file": str(pki.node.key_file),
    }
    if node_tls_material:
        keys = root / "state" / "keys"
        keys.mkdir(mode=0o700, parents=True)
        shutil.copyfile(pki.node.cert_file, keys / "tls.crt")
        shutil.copyfile(pki.node.key_file, keys / "tls.key")
        os.chmod(keys / "tls.key", 0o600)
        client = {}
    return GatewayNode(
        root,
        worker={"enabled": False},
        audit={
            "export": {
                "enabled": True,
                "host": "127.0.0.1",
                "port": port,
                "ca_file": str(pki.ca),
                **client,
                "app_name": "gw-audit-test",
                "enterprise_site_id": "TEST-SITE",
                "poll_interval": 0.2,
                "backoff_initial": 0.2,
                "backoff_max": 1,
                "timeout": 5,
                **export,
            }
        },
    )


def store(node: GatewayNode, files: list[Path], aet: str = "MODALITY") -> None:
    proc = dcmtk(
        "storescu", "-aet", aet, "-aec", node.ae_title, "127.0.0.1", str(node.port), *files
    )
    assert proc.returncode == 0, proc.stderr


def audit_rows(node: GatewayNode) -> list[dict[str, Any]]:
    return list(node.cli_json("audit", "list", "--limit", "100000"))


def metric(node: GatewayNode, name: str, labels: str = "") -> float:
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", re.MULTILINE)
    m = pattern.search(node.metrics())
    return float(m.group(1)) if m else 0.0


def wait_until(predicate: Any, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def wait_all_sent(
    node: GatewayNode, receiver: SyslogTLSReceiver, timeout: float = 30.0
) -> set[int]:
    """Every local audit row's sequence number has arrived; returns them."""
    local: set[int] = set()

    def done() -> bool:
        nonlocal local
        local = {r["seq"] for r in audit_rows(node)}
        return bool(local) and local <= receiver.sequences()

    try:
        wait_until(done, timeout, "every audit row at the receiver")
    except AssertionError:
        missing = sorted(local - receiver.sequences())
        raise AssertionError(f"missing at the receiver: {missing}\n{node.log()}") from None
    return local


def by_seq(receiver: SyslogTLSReceiver) -> dict[int, SyslogMessage]:
    return {m.sequence: m for m in receiver.received()}


def code(element: ET.Element | None) -> str:
    assert element is not None
    return element.attrib["csd-code"]


def objects(doc: ET.Element, id_type: str) -> list[ET.Element]:
    return [
        o
        for o in doc.findall("ParticipantObjectIdentification")
        if code(o.find("ParticipantObjectIDTypeCode")) == id_type
    ]


# --------------------------------------------------------------------------- (1)


def test_storescu_audit_arrives_as_dicom_audit_messages(tmp_path: Path, pki: Pki) -> None:
    files = make_ct_study(tmp_path / "study", 3, seed=51)
    with (
        receiver_for(pki) as receiver,
        export_node(tmp_path / "node", pki, receiver.port, node_tls_material=True) as node,
    ):
        store(node, files)
        wait_all_sent(node, receiver)
        rows = {r["seq"]: r for r in audit_rows(node)}
    messages = by_seq(receiver)
    assert not receiver.bad_frames
    # the node presented its own TLS certificate (mutual TLS; the receiver requires one)
    assert receiver.client_certificates
    subject = dict(x[0] for x in receiver.client_certificates[0]["subject"])  # type: ignore[index]
    assert subject["commonName"] == "gateway-node"

    stored = set(sop_instance_uids(files))
    seen_instances = set()
    for seq, row in rows.items():
        message = messages[seq]
        assert message.msgid == "IHE+RFC-3881"
        assert message.app_name == "gw-audit-test"
        assert message.pri in (84, 85)  # authpriv.warning / authpriv.notice
        doc = ET.fromstring(message.document)  # well-formed, or this raises
        assert doc.tag == "AuditMessage"
        ident = doc.find("EventIdentification")
        assert ident is not None
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", ident.attrib["EventDateTime"]
        )
        source = doc.find("AuditSourceIdentification")
        assert source is not None and source.attrib["AuditSourceID"] == "test-node"
        assert source.attrib["AuditEnterpriseSiteID"] == "TEST-SITE"
        if row["event_type"] == "c-store":
            assert code(ident.find("EventID")) == "110104"
            assert ident.attrib["EventActionCode"] == "C"
            assert ident.attrib["EventOutcomeIndicator"] == "0"
            (study,) = objects(doc, "110180")
            assert study.attrib["ParticipantObjectID"] == row["study_instance_uid"]
            sop = study.find("SOPClass")
            assert sop is not None and sop.attrib["UID"] == row["sop_class_uid"]
            instance = sop.find("Instance")
            assert instance is not None
            seen_instances.add(instance.attrib["UID"])
            (patient,) = objects(doc, "2")
            assert patient.attrib["ParticipantObjectID"] == DEFAULT_PATIENT_ID
            roles = {code(p.find("RoleIDCode")): p.attrib for p in doc.findall("ActiveParticipant")}
            assert roles["110153"]["AlternativeUserID"] == "AETITLES=MODALITY"
            assert roles["110153"]["UserIsRequestor"] == "true"
            assert roles["110153"]["NetworkAccessPointID"] == "127.0.0.1"
            assert roles["110152"]["AlternativeUserID"] == f"AETITLES={node.ae_title}"
        elif row["event_type"] == "association" and row["outcome"] == "accepted":
            assert code(ident.find("EventID")) == "110114"
            assert code(ident.find("EventTypeCode")) == "110122"
    assert seen_instances == stored
    assert sum(r["event_type"] == "c-store" for r in rows.values()) == len(files)


# --------------------------------------------------------------------------- (2)


def test_repository_down_ingest_goes_on_and_every_row_arrives_later(
    tmp_path: Path, pki: Pki
) -> None:
    port = free_port()
    first = receiver_for(pki, port=port).start()
    with export_node(tmp_path / "node", pki, port) as node:
        store(node, make_ct_study(tmp_path / "a", 2, seed=52))
        wait_all_sent(node, first)
        first.stop()  # the repository goes down, dropping the connection

        files = make_ct_study(tmp_path / "b", 6, seed=53)
        started = time.monotonic()
        store(node, files)  # every C-STORE answered Success while it is down
        assert time.monotonic() - started < 20
        rows = audit_rows(node)
        stored = {r["sop_instance_uid"] for r in rows if r["event_type"] == "c-store"}
        assert set(sop_instance_uids(files)) <= stored
        assert node.cli("audit", "verify").returncode == 0
        wait_until(
            lambda: metric(node, "gateway_audit_export_failures_total", '{kind="connect"}') >= 2,
            what="connection failures counted",
        )
        assert metric(node, "gateway_audit_export_lag_rows") >= len(files)

        second = receiver_for(pki, port=port).start()  # back up, on the same port
        try:
            local = wait_all_sent(node, second, timeout=40)
            wait_until(
                lambda: metric(node, "gateway_audit_export_lag_rows") == 0, what="lag back to 0"
            )
        finally:
            second.stop()
    down = {r["seq"] for r in rows} - first.sequences()
    assert down, "rows recorded while the repository was down"
    assert down <= second.sequences()
    assert local <= first.sequences() | second.sequences()


# --------------------------------------------------------------------------- (3)


def test_repository_resets_after_n_frames_exporter_resends_from_the_last_unsent(
    tmp_path: Path, pki: Pki
) -> None:
    files = make_ct_study(tmp_path / "study", 20, seed=54)
    with (
        receiver_for(pki, reset_after=5) as receiver,
        export_node(tmp_path / "node", pki, receiver.port, batch_size=4) as node,
    ):
        store(node, files)
        local = wait_all_sent(node, receiver, timeout=40)
        failures = metric(node, "gateway_audit_export_failures_total", '{kind="send"}')
    assert receiver.connections >= 2
    assert failures >= 1
    first = [m.sequence for m in receiver.received() if m.connection == 1]
    assert len(first) == 5  # it read five frames, then reset
    later = [m.sequence for m in receiver.received() if m.connection > 1]
    # the next connection starts at or before the first row the repository did not read
    assert min(later) <= max(first) + 1
    assert local <= receiver.sequences()


# --------------------------------------------------------------------------- (4)


def _raw_associate(port: int, calling: bytes) -> bytes:
    """An A-ASSOCIATE-RQ whose 16-byte calling AE field is ``calling`` (space padded)."""
    pdu = bytearray(associate_rq(calling="MODALITY"))
    pdu[26:42] = calling.ljust(16, b" ")[:16]  # PS3.8 9.3.2: calling AE title at 27-42
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(bytes(pdu))
        try:
            return sock.recv(64)
        except OSError:
            return b""


def test_hostile_values_are_escaped_in_well_formed_xml(tmp_path: Path, pki: Pki) -> None:
    """A10: a hostile (printable) calling AE title, AE titles with NUL/ESC/backslash/non-ASCII
    on the wire, and patient values with markup, ESC, NUL, backslash and non-ASCII."""
    (path,) = make_ct_study(
        tmp_path / "study",
        1,
        seed=56,
        patient_id=HOSTILE_PATIENT_ID,
        patient_name=HOSTILE_PATIENT_NAME,
        SpecificCharacterSet="ISO_IR 192",
    )
    with receiver_for(pki) as receiver, export_node(tmp_path / "node", pki, receiver.port) as node:
        ae = AE(ae_title=HOSTILE_AE)
        ae.add_requested_context("1.2.840.10008.1.1")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established, node.log()
        assert assoc.send_c_echo().Status == 0
        assert assoc.send_c_store(path).Status == 0
        assoc.release()
        # NUL, ESC, backslash or non-ASCII in the calling AE field: pynetdicom cannot take
        # the A-ASSOCIATE-RQ apart, the node aborts it and audits invalid-pdu
        for calling in (b"X\x00Y", b"X\x1bY", b"X\\Y", b"X\xc3\xa9"):
            assert _raw_associate(node.port, calling)[:1] in (b"\x07", b"")  # A-ABORT
        wait_until(lambda: len(audit_rows(node)) >= 7, what="the audit rows")
        wait_all_sent(node, receiver)
        rows = audit_rows(node)
    messages = by_seq(receiver)
    assert not receiver.bad_frames
    user_ids = set()
    for row in rows:
        document = messages[row["seq"]].document
        # ASCII without control characters: the rest are character references or escapes
        assert not re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\xff]", document)
        doc = ET.fromstring(document)  # well-formed, or this raises
        user_ids |= {p.attrib["UserID"] for p in doc.findall("ActiveParticipant")}
    # the printable AE title arrives exactly as the peer sent it, escaped by the XML writer
    assert HOSTILE_AE in user_ids
    echo = next(r for r in rows if r["event_type"] == "c-echo")
    assert b"&lt;a&gt;&amp;'&quot;;--%s{}" in messages[echo["seq"]].document
    # patient values: markup and non-ASCII round-trip; ESC and NUL become visible escapes
    stored = next(r for r in rows if r["event_type"] == "c-store")
    doc = ET.fromstring(messages[stored["seq"]].document)
    (patient,) = objects(doc, "2")
    assert patient.attrib["ParticipantObjectID"] == HOSTILE_PATIENT_ID.replace("\x1b", "\\x1b")
    name = patient.findtext("ParticipantObjectName")
    assert name is not None
    assert "<a>&'\";--%s{}" in name and "Jöhn" in name and "\\x1b" in name
    assert "\x1b" not in name and "\x00" not in name
    # the refused associations are Security Alerts
    aborted = [r for r in rows if r["outcome"] == "aborted"]
    assert len(aborted) == 4
    for row in aborted:
        doc = ET.fromstring(messages[row["seq"]].document)
        assert code(doc.find("EventIdentification/EventID")) == "110113"
        assert doc.findtext("EventIdentification/EventOutcomeDescription") == "invalid-pdu"


# --------------------------------------------------------------------------- (5)


def test_repository_with_a_certificate_from_another_ca_is_refused(tmp_path: Path, pki: Pki) -> None:
    rogue = SyslogTLSReceiver(
        cert_file=pki.rogue_repository.cert_file, key_file=pki.rogue_repository.key_file
    )
    files = make_ct_study(tmp_path / "study", 2, seed=55)
    with rogue, export_node(tmp_path / "node", pki, rogue.port) as node:
        store(node, files)
        wait_until(
            lambda: metric(node, "gateway_audit_export_failures_total", '{kind="tls"}') >= 2,
            what="TLS failures counted",
        )
        rows = audit_rows(node)
        assert node.cli("audit", "verify").returncode == 0
        lag = metric(node, "gateway_audit_export_lag_rows")
    assert rogue.received() == []
    assert rogue.connections == 0  # no handshake ever completed
    assert lag == len(rows)
    stored = {r["sop_instance_uid"] for r in rows if r["event_type"] == "c-store"}
    assert set(sop_instance_uids(files)) <= stored
