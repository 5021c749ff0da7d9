"""Audit export: the PS3.15 A.5 mapping, XML escaping, RFC 5424/5425 framing, the exporter's
cursor, resend and backoff against a real SQLite index, and the [audit.export] config."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.audit.atna import (
    AuditEntry,
    AuditSource,
    Patient,
    build_message,
    event_for,
    xml_safe,
)
from gateway.audit.chain import AuditRecord, append
from gateway.audit.export import AuditExporter
from gateway.audit.syslog import frame, syslog_message
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.config.model import AuditConfig, AuditExportConfig, GatewayConfig
from gateway.errors import AuditExportError, ConfigError
from gateway.index.db import Database
from gateway.index.models import AuditEvent, AuditExportCursor
from gateway.metrics import Metrics
from tests.unit.test_config import DEFAULT, _documented_keys

T0 = datetime(2026, 11, 23, 14, 0, 0, 123456, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"
SOURCE = AuditSource("node-a", "SITE-1")


def entry(event_type: str, outcome: str, **kwargs: Any) -> AuditEntry:
    values: dict[str, Any] = {
        "seq": 7,
        "recorded_at": T0,
        "event_type": event_type,
        "outcome": outcome,
        "node": "node-a",
        "calling_ae_title": "CT1",
        "called_ae_title": "GATEWAY",
        "address": "10.0.0.7",
    }
    values.update(kwargs)
    return AuditEntry(**values)


def parse(e: AuditEntry, patients: dict[str, Patient] | None = None) -> ET.Element:
    return ET.fromstring(build_message(e, source=SOURCE, patients=patients))


def codes(doc: ET.Element, path: str) -> list[str]:
    return [el.attrib["csd-code"] for el in doc.findall(path)]


# --- the mapping table (README "Audit export") -------------------------------------------

MAPPING: list[tuple[str, AuditEntry, str, str, int, list[str]]] = [
    # (id, row, EventID, EventActionCode, EventOutcomeIndicator, EventTypeCodes)
    ("assoc-accepted", entry("association", "accepted"), "110114", "E", 0, ["110122"]),
    (
        "assoc-rejected-not-allowed",
        entry("association", "rejected", detail={"reason": "calling-ae-not-allowed"}),
        "110113",
        "E",
        4,
        ["110126"],
    ),
    (
        "assoc-rejected-limit",
        entry("association", "rejected", detail={"reason": "association-limit"}),
        "110114",
        "E",
        4,
        ["110122"],
    ),
    (
        "assoc-peer-abort",
        entry("association", "aborted", detail={"reason": "peer-abort"}),
        "110114",
        "E",
        4,
        ["110123"],
    ),
    (
        "assoc-invalid-pdu",
        entry("association", "aborted", detail={"reason": "invalid-pdu"}),
        "110113",
        "E",
        4,
        ["protocol-violation"],
    ),
    (
        "tls-handshake",
        entry("security", "failure", detail={"reason": "tls-handshake-failed"}),
        "110113",
        "E",
        4,
        ["110126"],
    ),
    (
        "c-store",
        entry("c-store", "success", sop_class_uid=CT, sop_instance_uid="1.2.3.4.1"),
        "110104",
        "C",
        0,
        [],
    ),
    (
        "c-store-identical-duplicate",
        entry("c-store", "success", detail={"duplicate": "identical"}),
        "110104",
        "R",
        0,
        [],
    ),
    (
        "c-store-new-version",
        entry("c-store", "success", detail={"duplicate": "different-content-kept"}),
        "110104",
        "U",
        0,
        [],
    ),
    ("c-store-refused", entry("c-store", "failure", status=0xA900), "110104", "C", 4, []),
    ("peer-store", entry("peer-store", "success"), "110104", "C", 0, []),
    ("c-find", entry("c-find", "success", detail={"model": "STUDY"}), "110112", "E", 0, []),
    (
        "c-find-not-authorized",
        entry("c-find", "refused", status=0x0124, detail={"reason": "caller-not-allowed"}),
        "110113",
        "E",
        4,
        ["110132"],
    ),
    ("c-move-started", entry("c-move", "started"), "110102", "E", 0, []),
    (
        "c-move-finished",
        entry("c-move", "success", status=0, detail={"completed": 3, "failed": 0}),
        "110104",
        "R",
        0,
        [],
    ),
    (
        "c-move-partly-failed",
        entry("c-move", "failure", status=0xB000, detail={"completed": 2, "failed": 1}),
        "110104",
        "R",
        4,
        [],
    ),
    (
        "c-move-all-failed",
        entry("c-move", "failure", status=0xA702, detail={"completed": 0, "failed": 3}),
        "110104",
        "R",
        8,
        [],
    ),
    (
        "c-move-unknown-destination",
        entry("c-move", "refused", status=0xA801, detail={"reason": "move-destination-unknown"}),
        "110102",
        "E",
        4,
        [],
    ),
    (
        "c-get-not-authorized",
        entry("c-get", "refused", status=0x0124, detail={"reason": "x"}),
        "110113",
        "E",
        4,
        ["110132"],
    ),
    ("sub-operation", entry("sub-operation", "success"), "110104", "R", 0, []),
    ("sub-operation-failed", entry("sub-operation", "failure"), "110104", "R", 4, []),
    ("delivery", entry("delivery-attempt", "success"), "110104", "R", 0, []),
    ("delivery-warning", entry("delivery-attempt", "warning"), "110104", "R", 0, []),
    ("delivery-retry", entry("delivery-attempt", "retry"), "110104", "R", 4, []),
    ("delivery-failed", entry("delivery-attempt", "failure"), "110104", "R", 8, []),
    ("peer-package", entry("peer-package", "success"), "110104", "C", 0, []),
    ("node-started", entry("application", "started"), "110100", "E", 0, ["110120"]),
    ("node-stopped", entry("application", "stopped"), "110100", "E", 0, ["110121"]),
    ("c-echo", entry("c-echo", "success"), "110100", "E", 0, ["c-echo"]),
    ("route", entry("route", "success"), "110100", "E", 0, ["route"]),
    ("peer-receipt", entry("peer-receipt", "success"), "110100", "E", 0, ["peer-receipt"]),
    ("unknown-type", entry("key-rotation", "failure"), "110100", "E", 4, ["key-rotation"]),
]


@pytest.mark.parametrize(
    ("row", "event_id", "action", "outcome", "types"),
    [pytest.param(*case[1:], id=case[0]) for case in MAPPING],
)
def test_mapping(
    row: AuditEntry, event_id: str, action: str, outcome: int, types: list[str]
) -> None:
    doc = parse(row)
    ident = doc.find("EventIdentification")
    assert ident is not None
    assert codes(doc, "EventIdentification/EventID") == [event_id]
    assert ident.attrib["EventActionCode"] == action
    assert ident.attrib["EventOutcomeIndicator"] == str(outcome)
    assert codes(doc, "EventIdentification/EventTypeCode") == types
    assert ident.attrib["EventDateTime"] == "2026-11-23T14:00:00.123456Z"
    # every message names at least one requestor and its source
    assert any(p.attrib["UserIsRequestor"] == "true" for p in doc.findall("ActiveParticipant")) or (
        event_id == "110100"
    )
    source = doc.find("AuditSourceIdentification")
    assert source is not None
    assert source.attrib == {"AuditSourceID": "node-a", "AuditEnterpriseSiteID": "SITE-1"}
    assert codes(doc, "AuditSourceIdentification/AuditSourceTypeCode") == ["4"]


def test_element_order_follows_the_schema() -> None:
    doc = parse(entry("c-store", "success", study_instance_uid="1.2.3", sop_class_uid=CT))
    tags = [child.tag for child in doc]
    assert tags == [
        "EventIdentification",
        "ActiveParticipant",
        "ActiveParticipant",
        "AuditSourceIdentification",
        "ParticipantObjectIdentification",
    ]


def test_c_store_participants_and_objects() -> None:
    row = entry(
        "c-store",
        "success",
        sop_class_uid=CT,
        sop_instance_uid="1.2.3.4.1",
        study_instance_uid="1.2.3.4",
    )
    doc = parse(row, {"1.2.3.4": Patient("PID-1", "Doe^John")})
    source, destination = doc.findall("ActiveParticipant")
    assert source.attrib == {
        "UserID": "CT1",
        "UserIsRequestor": "true",
        "AlternativeUserID": "AETITLES=CT1",
        "NetworkAccessPointID": "10.0.0.7",
        "NetworkAccessPointTypeCode": "2",
    }
    assert codes(source, "RoleIDCode") == ["110153"]
    assert destination.attrib["AlternativeUserID"] == "AETITLES=GATEWAY"
    assert destination.attrib["UserIsRequestor"] == "false"
    assert codes(destination, "RoleIDCode") == ["110152"]
    study, patient = doc.findall("ParticipantObjectIdentification")
    assert study.attrib == {
        "ParticipantObjectID": "1.2.3.4",
        "ParticipantObjectTypeCode": "2",
        "ParticipantObjectTypeCodeRole": "3",
    }
    assert codes(study, "ParticipantObjectIDTypeCode") == ["110180"]
    sop = study.find("SOPClass")
    assert sop is not None and sop.attrib == {"UID": CT, "NumberOfInstances": "1"}
    assert [i.attrib["UID"] for i in sop.findall("Instance")] == ["1.2.3.4.1"]
    assert patient.attrib["ParticipantObjectID"] == "PID-1"
    assert patient.attrib["ParticipantObjectTypeCodeRole"] == "1"
    assert codes(patient, "ParticipantObjectIDTypeCode") == ["2"]
    assert patient.findtext("ParticipantObjectName") == "Doe^John"


def test_query_carries_the_keys_and_the_sop_class() -> None:
    keys = {"PatientName": "DOE*", "StudyDate": "20240101-"}
    doc = parse(entry("c-find", "success", detail={"model": "PATIENT", "keys": keys}))
    (query,) = doc.findall("ParticipantObjectIdentification")
    assert query.attrib["ParticipantObjectID"] == "1.2.840.10008.5.1.4.1.2.1.1"
    assert query.attrib["ParticipantObjectTypeCodeRole"] == "24"
    assert codes(query, "ParticipantObjectIDTypeCode") == ["110181"]
    encoded = query.findtext("ParticipantObjectQuery")
    assert encoded is not None
    assert json.loads(base64.b64decode(encoded)) == keys


def test_retrieve_names_every_study_and_the_move_destination() -> None:
    row = entry(
        "c-move",
        "started",
        detail={"destination": "WS1", "studies": ["1.2.1", "1.2.2"], "instances": 4},
    )
    doc = parse(row, {"1.2.1": Patient("P1"), "1.2.2": Patient("P1")})
    studies = [
        o.attrib["ParticipantObjectID"]
        for o in doc.findall("ParticipantObjectIdentification")
        if codes(o, "ParticipantObjectIDTypeCode") == ["110180"]
    ]
    assert studies == ["1.2.1", "1.2.2"]
    patients = [
        o
        for o in doc.findall("ParticipantObjectIdentification")
        if o.attrib["ParticipantObjectTypeCode"] == "1"
    ]
    assert len(patients) == 1  # one patient, named once
    roles = {
        codes(p, "RoleIDCode")[0] if p.find("RoleIDCode") is not None else "": p.attrib
        for p in doc.findall("ActiveParticipant")
    }
    assert roles["110152"]["UserID"] == "WS1"
    assert roles[""]["UserIsRequestor"] == "true"  # the C-MOVE requestor


def test_security_alert_describes_the_reason() -> None:
    row = entry(
        "security", "failure", detail={"reason": "tls-handshake-failed", "error": "unknown ca"}
    )
    doc = parse(row)
    assert doc.findtext("EventIdentification/EventOutcomeDescription") == (
        "tls-handshake-failed; unknown ca"
    )
    (subject,) = doc.findall("ParticipantObjectIdentification")
    assert subject.attrib["ParticipantObjectID"] == "10.0.0.7"
    assert codes(subject, "ParticipantObjectIDTypeCode") == ["110182"]
    detail = subject.find("ParticipantObjectDetail")
    assert detail is not None
    assert base64.b64decode(detail.attrib["value"]) == b"tls-handshake-failed; unknown ca"


def test_row_written_by_the_chain_reads_back_into_the_same_message(db: Database) -> None:
    """A10 through the real writer: the chain escapes peer text, the XML stays well-formed."""
    record = AuditRecord(
        "c-store",
        "success",
        "<a>&'\";--%s{}",
        "GW\x00\x1b\\é",
        "127.0.0.1",
        sop_class_uid=CT,
        sop_instance_uid="1.2.3.4.1",
        study_instance_uid="1.2.3.4",
        status=0,
        detail={"reason": "x\x00y\x1bz<&>"},
    )
    with db.session() as s:
        seq = append(s, record, node="node-a", now=T0)
    with db.session() as s:
        row = s.get(AuditEvent, seq)
        assert row is not None
        e = AuditEntry.from_row(row)
    doc = parse(e)
    source, destination = doc.findall("ActiveParticipant")
    assert source.attrib["UserID"] == "<a>&'\";--%s{}"
    assert destination.attrib["UserID"] == "GW\\x00\\x1b\\x5c\\xe9"
    assert event_for(e).event_id.value == "110104"


# --- XML 1.0 safety ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", "plain"),
        ("<a>&'\";--%s{}", "<a>&'\";--%s{}"),  # markup is the XML writer's to escape
        ("a\x00b", "a\\x00b"),
        ("\x1b[31m", "\\x1b[31m"),
        ("tab\tnl\ncr\r", "tab\tnl\ncr\r"),  # legal in XML 1.0
        ("\x7f\x85é", "\\x7f\\x85é"),  # DEL and C1 controls: discouraged (XML 1.0 2.2)
        ("\ud800x", "\\ud800x"),  # a lone surrogate
        ("\ufffe\uffff", "\\ufffe\\uffff"),
        ("\U0001f600", "\U0001f600"),
        ("back\\slash", "back\\slash"),
    ],
)
def test_xml_safe(value: str, expected: str) -> None:
    assert xml_safe(value) == expected


@settings(max_examples=200, deadline=None)
@given(
    calling=st.text(max_size=24),
    reason=st.text(max_size=40),
    patient_name=st.text(max_size=40),
    patient_id=st.text(min_size=1, max_size=20),
)
def test_any_text_gives_well_formed_xml(
    calling: str, reason: str, patient_name: str, patient_id: str
) -> None:
    row = entry(
        "c-store",
        "failure",
        calling_ae_title=calling,
        study_instance_uid="1.2.3",
        detail={"reason": reason},
    )
    document = build_message(
        row, source=SOURCE, patients={"1.2.3": Patient(patient_id, patient_name)}
    )
    assert re.fullmatch(rb"[\t\n\r\x20-\x7e]*", document)  # ASCII: the rest are references
    doc = ET.fromstring(document)
    participant = doc.find("ActiveParticipant")
    assert participant is not None
    if calling:
        # attribute values round-trip (newlines and tabs are character references)
        assert participant.attrib["UserID"] == xml_safe(calling)
    patient = doc.findall("ParticipantObjectIdentification")[-1]
    assert patient.attrib["ParticipantObjectID"] == xml_safe(patient_id)
    # element text: the parser normalises line ends (XML 1.0 2.11)
    expected_name = xml_safe(patient_name).replace("\r\n", "\n").replace("\r", "\n")
    assert (patient.findtext("ParticipantObjectName") or "") == expected_name


# --- RFC 5424 / 5425 ------------------------------------------------------------------------


def test_syslog_message_and_octet_counting() -> None:
    document = build_message(entry("c-echo", "success"), source=SOURCE)
    message = syslog_message(
        document,
        sequence=123,
        timestamp=T0,
        hostname="host one\x00",
        app_name="dicom-gateway",
        procid="4711",
    )
    assert message.startswith(
        b"<85>1 2026-11-23T14:00:00.123456Z hostone dicom-gateway 4711 IHE+RFC-3881 "
        b'[meta sequenceId="123"] <?xml'
    )
    assert message.endswith(document)
    framed = frame(message)
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(message) == len(rest)
    assert rest == message
    failed = syslog_message(
        document, sequence=1, timestamp=T0, hostname="", app_name="", procid="", failure=True
    )
    assert failed.startswith(b"<84>1 2026-11-23T14:00:00.123456Z - - - IHE+RFC-3881 ")


# --- the exporter against a real index, with a fake repository -----------------------------


class FakeRepository:
    """Connections that record what was written; fails as scripted."""

    def __init__(self) -> None:
        self.sent: list[int] = []  # sequence numbers, in order of writes
        self.connects: list[float] = []
        self.refuse = 0  # refuse this many connects
        self.drop_after: int | None = None  # drop the connection after this many messages
        self.lock = threading.Lock()

    def connect(self) -> FakeConnection:
        with self.lock:
            self.connects.append(time.monotonic())
            if self.refuse:
                self.refuse -= 1
                raise AuditExportError("connect", "ConnectionRefusedError")
        return FakeConnection(self)


class FakeConnection:
    def __init__(self, repository: FakeRepository) -> None:
        self.repository = repository
        self.open = True
        self.count = 0

    def send(self, data: bytes) -> None:
        if not self.open:
            raise AuditExportError("send", "BrokenPipeError")
        for seq in (int(s) for s in re.findall(rb'\[meta sequenceId="(\d+)"\]', data)):
            with self.repository.lock:
                self.repository.sent.append(seq)
            self.count += 1
        drop = self.repository.drop_after
        if drop is not None and self.count >= drop:
            self.repository.drop_after = None
            self.open = False  # dropped after these were written: their fate is unknown

    def alive(self) -> bool:
        return self.open

    def close(self) -> None:
        self.open = False


def make_config(tmp_path: Path, **export: Any) -> GatewayConfig:
    values: dict[str, Any] = {
        "enabled": True,
        "host": "repository.example",
        "ca_file": tmp_path / "ca.crt",
        "poll_interval": 0.02,
        "backoff_initial": 0.02,
        "backoff_max": 0.1,
        **export,
    }
    return GatewayConfig(
        source=tmp_path / "gateway.toml",
        audit=AuditConfig(export=AuditExportConfig(**values)),
    )


def add_rows(db: Database, n: int) -> None:
    for i in range(n):
        with db.session() as s:
            append(
                s,
                AuditRecord("c-echo", "success", f"MOD{i}", "GATEWAY", "10.0.0.7"),
                node="node-a",
                now=T0,
            )


def run_until(exporter: AuditExporter, done: Callable[[], bool], timeout: float = 10.0) -> None:
    exporter.start()
    try:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "exporter did not get there in time"
            time.sleep(0.01)
    finally:
        exporter.stop()


def cursor_row(db: Database, repository: str = "repository.example:6514") -> int | None:
    with db.session() as s:
        row = s.get(AuditExportCursor, repository)
        return None if row is None else row.seq


def test_sends_every_row_in_order_and_keeps_a_durable_cursor(db: Database, tmp_path: Path) -> None:
    add_rows(db, 25)
    repo = FakeRepository()
    metrics = Metrics()
    exporter = AuditExporter(
        make_config(tmp_path, batch_size=10),
        db=db,
        clock=SystemClock(),
        metrics=metrics,
        connector=repo.connect,
    )
    run_until(exporter, lambda: cursor_row(db) == 25)
    assert repo.sent == list(range(1, 26))
    assert metrics.registry.get_sample_value("gateway_audit_export_lag_rows") == 0
    assert metrics.registry.get_sample_value("gateway_audit_export_messages_total") == 25
    # a restarted exporter resends only the window before the cursor
    add_rows(db, 3)
    again = FakeRepository()
    exporter = AuditExporter(
        make_config(tmp_path, resend_on_reconnect=2),
        db=db,
        clock=SystemClock(),
        metrics=Metrics(),
        connector=again.connect,
    )
    run_until(exporter, lambda: cursor_row(db) == 28)
    assert again.sent == [24, 25, 26, 27, 28]


def test_dropped_connection_resends_from_before_the_cursor(db: Database, tmp_path: Path) -> None:
    add_rows(db, 30)
    repo = FakeRepository()
    repo.drop_after = 12  # the repository goes away after 12 messages
    metrics = Metrics()
    exporter = AuditExporter(
        make_config(tmp_path, batch_size=4, resend_on_reconnect=5),
        db=db,
        clock=SystemClock(),
        metrics=metrics,
        connector=repo.connect,
    )
    run_until(exporter, lambda: cursor_row(db) == 30)
    assert set(repo.sent) == set(range(1, 31))
    assert len(repo.connects) == 2
    # 12 written before the drop, cursor 12: the next connection starts at 12 - 5 + 1
    assert repo.sent[:12] == list(range(1, 13))
    assert repo.sent[12:] == list(range(8, 31))
    failures = metrics.registry.get_sample_value(
        "gateway_audit_export_failures_total", {"kind": "send"}
    )
    assert failures == 1


def test_backs_off_exponentially_with_a_cap_while_down(db: Database, tmp_path: Path) -> None:
    add_rows(db, 2)
    repo = FakeRepository()
    repo.refuse = 6
    metrics = Metrics()
    exporter = AuditExporter(
        make_config(tmp_path, backoff_initial=0.05, backoff_max=0.2),
        db=db,
        clock=SystemClock(),
        metrics=metrics,
        connector=repo.connect,
    )
    run_until(exporter, lambda: cursor_row(db) == 2)
    gaps = [b - a for a, b in zip(repo.connects, repo.connects[1:], strict=False)]
    assert len(gaps) == 6
    expected = [0.05, 0.1, 0.2, 0.2, 0.2, 0.2]
    for gap, wait in zip(gaps, expected, strict=True):
        assert wait * 0.9 <= gap < wait + 0.25, (gaps, expected)
    assert (
        metrics.registry.get_sample_value(
            "gateway_audit_export_failures_total", {"kind": "connect"}
        )
        == 6
    )
    assert repo.sent == [1, 2]


def test_nothing_pending_means_no_connection(db: Database, tmp_path: Path) -> None:
    repo = FakeRepository()
    exporter = AuditExporter(
        make_config(tmp_path), db=db, clock=SystemClock(), metrics=Metrics(), connector=repo.connect
    )
    exporter.start()
    time.sleep(0.2)
    exporter.stop()
    assert repo.connects == [] and cursor_row(db) is None


# --- configuration ------------------------------------------------------------------------


def test_every_export_key_is_documented_and_the_default_is_off() -> None:
    documented = _documented_keys()
    missing = [f.name for f in dataclasses.fields(AuditExportConfig) if f.name not in documented]
    assert not missing
    assert re.search(r"^\[audit\.export\]$", DEFAULT.read_text(), flags=re.MULTILINE)
    assert load_config(DEFAULT).audit == AuditConfig()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_good_export_section_loads(tmp_path: Path) -> None:
    cfg = load_config(
        _write(
            tmp_path,
            '[audit.export]\nenabled = true\nhost = "arr.example.org"\nca_file = "ca.crt"\n'
            'cert_file = "n.crt"\nkey_file = "n.key"\nbatch_size = 10\nresend_on_reconnect = 0\n',
        )
    )
    export = cfg.audit.export
    assert export.enabled and export.host == "arr.example.org" and export.port == 6514
    assert export.ca_file == tmp_path / "ca.crt"
    assert export.cert_file == tmp_path / "n.crt"
    assert export.resend_on_reconnect == 0


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('[audit.export]\nenabled = true\nca_file = "ca.crt"\n', "audit.export.host", "host"),
        ('[audit.export]\nenabled = true\nhost = "a"\n', "audit.export.ca_file", "CA file"),
        ('[audit.export]\ncert_file = "c.crt"\n', "audit.export.key_file", "together"),
        (
            "[audit.export]\nbackoff_initial = 10\nbackoff_max = 5\n",
            "audit.export.backoff_max",
            "backoff_initial or more",
        ),
        ("[audit.export]\nbatch_size = 0\n", "audit.export.batch_size", "greater than 0"),
        (
            "[audit.export]\nresend_on_reconnect = -1\n",
            "audit.export.resend_on_reconnect",
            "0 or more",
        ),
        ("[audit.export]\nport = 0\n", "audit.export.port", "between 1 and 65535"),
        ('[audit.export]\napp_name = "two words"\n', "audit.export.app_name", "APP-NAME"),
        ("[audit.export]\npoll_interval = 0\n", "audit.export.poll_interval", "greater than 0"),
        ("[audit.export]\nenable = true\n", "audit.export.enable", "no such key"),
        ('[audit.export]\nserver_name = "a b"\n', "audit.export.server_name", "printable"),
    ],
)
def test_bad_export_section_names_the_key(
    tmp_path: Path, text: str, key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert info.value.key == key
    assert fragment in info.value.expected
