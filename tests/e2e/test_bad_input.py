"""Bad input against a real node (``dicom-gateway serve``): answered clearly, audited, survived.

Every case sends something hostile or malformed (FAULTS_AND_ATTACKS.md rows 1-20, A1-A16),
checks the answer (A-ASSOCIATE-RJ, A-ABORT, a close, or a DIMSE status), checks the audit
record and that the audit chain verifies, and then checks that the node still serves: a
DCMTK ``echoscu`` association must succeed after each case.

Nodes are shared per module (``main_node``, ``strict_node``) to keep the suite fast; each
test looks only at the audit records written since its start.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import struct
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, _config

from tests.support.datasets import build_instance, make_instance
from tests.support.node import GatewayNode
from tests.support.pdus import (
    associate_rq,
    is_abort_or_empty,
    p_data,
    read_pdu,
    rss_kib,
    wait_closed,
)
from tests.support.peers import dcmtk

CALLING = "MODALITY"
VERIFICATION = "1.2.840.10008.1.1"
MAX_PDU = 262144  # the node's default dicom.max_pdu_size


# --------------------------------------------------------------------------- helpers


class Audited:
    """A node plus the audit sequence number up to which earlier tests have looked."""

    def __init__(self, node: GatewayNode) -> None:
        self.node = node
        self.seen = 0
        self.new: list[dict[str, Any]] = []  # the records the last expect() looked at

    def records(self) -> tuple[list[dict[str, Any]], int]:
        """All audit records and the ``audit verify`` exit code, fetched concurrently."""
        with ThreadPoolExecutor(2) as pool:
            rows = pool.submit(self.node.cli_json, "audit", "list", "--limit", "100000")
            verify = pool.submit(self.node.cli, "audit", "verify")
            return list(rows.result()), verify.result().returncode

    def expect(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """New records (since the last call) of which at least one matches ``predicate``;
        asserts the chain verifies. Returns the matching records."""
        deadline = time.monotonic() + timeout
        while True:
            rows, verify_rc = self.records()
            new = [r for r in rows if r["seq"] > self.seen]
            found = [r for r in new if predicate(r)]
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        self.seen = max([self.seen, *(r["seq"] for r in rows)])
        self.new = new
        assert verify_rc == 0, self.node.cli("audit", "verify").stderr
        assert found, f"no matching audit record among {new}\n{self.node.log()}"
        return found


def canary(node: GatewayNode) -> None:
    """A DCMTK echoscu association to the node must succeed."""
    args = ["-to", "5", "-aet", CALLING, "-aec", node.ae_title, "127.0.0.1", str(node.port)]
    proc = dcmtk("echoscu", *args, timeout=20)
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{node.log()}"


def security_events(node: GatewayNode) -> float:
    total = 0.0
    for line in node.metrics().splitlines():
        m = re.match(r"gateway_security_events_total\{[^}]*\} (\S+)$", line)
        if m:
            total += float(m.group(1))
    return total


def scu(ae_title: str = CALLING, contexts: list[tuple[str, list[str]]] | None = None) -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = 10
    ae.dimse_timeout = 10
    ae.network_timeout = 10
    for abstract, syntaxes in contexts or [(CTImageStorage, [ExplicitVRLittleEndian])]:
        ae.add_requested_context(abstract, syntaxes)
    return ae


def c_store(node: GatewayNode, path: Path) -> int:
    """Send one file (chunked, as is: its bytes are not re-encoded); return the status."""
    assoc = scu().associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established, node.log()
    try:
        status = assoc.send_c_store(path)
        assert "Status" in status, f"no C-STORE-RSP\n{node.log()}"
        return int(status.Status)
    finally:
        assoc.release()


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def connect(node: GatewayNode, timeout: float = 5.0, source: str = "") -> socket.socket:
    """A TCP connection to the node, from ``source`` (another loopback address) if given."""
    return socket.create_connection(
        ("127.0.0.1", node.port), timeout=timeout, source_address=(source, 0) if source else None
    )


def state_names(node: GatewayNode) -> list[str]:
    return [str(p.relative_to(node.state_dir)) for p in node.state_dir.rglob("*")]


def spooled(node: GatewayNode) -> set[Path]:
    """The committed spool objects (one per stored instance version)."""
    return set((node.state_dir / "spool" / "objects").glob("*/*.dcm"))


def assert_nothing_kept(node: GatewayNode, before: set[Path]) -> None:
    """A refused instance leaves no spool object and no receive buffer behind."""
    assert spooled(node) == before
    assert not list((node.state_dir / "spool" / "incoming").iterdir())


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def main_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audited]:
    """Only MODALITY may call GATEWAY; REMOTE only from 10.1.2.3; 2 s per PDU."""
    node = GatewayNode(
        tmp_path_factory.mktemp("bad-input") / "node",
        allow=[
            {"called_ae": "GATEWAY", "calling_ae": [CALLING]},
            {"called_ae": "GATEWAY", "calling_ae": ["REMOTE"], "addresses": ["10.1.2.3"]},
        ],
        dicom={"pdu_read_timeout": 2},
    )
    with node:
        yield Audited(node)


@pytest.fixture(scope="module")
def strict_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audited]:
    """Two associations at most; a different duplicate is rejected."""
    node = GatewayNode(
        tmp_path_factory.mktemp("bad-input-strict") / "node",
        dicom={"max_associations": 2},
        ingest={"duplicate_policy": "reject"},
    )
    with node:
        yield Audited(node)


@pytest.fixture
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send files as they are on disk (truncated or inconsistent bytes go out unchanged)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


# --------------------------------------------------------------------------- admission


def test_calling_ae_not_on_allowlist_rejected(main_node: Audited) -> None:
    node = main_node.node
    proc = dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "GATEWAY", "127.0.0.1", str(node.port))
    assert proc.returncode != 0
    assert "Calling AE Title Not Recognized" in proc.stdout + proc.stderr

    rec = main_node.expect(
        lambda r: r["event_type"] == "association" and r["calling_ae_title"] == "INTRUDER"
    )
    assert rec[0]["outcome"] == "rejected"
    assert rec[0]["detail"]["reason"] == "calling-ae-not-allowed"
    canary(node)


def test_wrong_called_ae_rejected_reason_7(main_node: Audited) -> None:
    node = main_node.node
    proc = dcmtk("echoscu", "-aet", CALLING, "-aec", "NOTUS", "127.0.0.1", str(node.port))
    assert proc.returncode != 0
    assert "Called AE Title Not Recognized" in proc.stdout + proc.stderr
    with connect(node) as sock:
        sock.sendall(associate_rq(called="NOTUS2"))
        rj = read_pdu(sock)
    # A-ASSOCIATE-RJ: result 1 (permanent), source 1 (service user), reason 7
    assert rj[0] == 0x03 and tuple(rj[7:10]) == (1, 1, 7), rj

    recs = main_node.expect(
        lambda r: r["event_type"] == "association" and r["called_ae_title"] == "NOTUS2"
    )
    assert recs[0]["outcome"] == "rejected"
    assert recs[0]["detail"]["reason"] == "called-ae-not-recognized"
    canary(node)


def test_allowlist_entry_bound_to_other_address_rejects(main_node: Audited) -> None:
    node = main_node.node
    proc = dcmtk("echoscu", "-aet", "REMOTE", "-aec", "GATEWAY", "127.0.0.1", str(node.port))
    assert proc.returncode != 0
    assert "Calling AE Title Not Recognized" in proc.stdout + proc.stderr
    recs = main_node.expect(
        lambda r: r["event_type"] == "association" and r["calling_ae_title"] == "REMOTE"
    )
    assert recs[0]["outcome"] == "rejected"
    assert recs[0]["detail"]["reason"] == "calling-ae-not-allowed"
    assert recs[0]["address"] == "127.0.0.1"
    canary(node)


# --------------------------------------------------------------------------- presentation


def test_unknown_sop_class_cannot_be_negotiated(main_node: Audited, tmp_path: Path) -> None:
    node = main_node.node
    path = make_instance(tmp_path / "unknown.dcm", sop_class_uid="1.2.3.4.5.6.7")
    proc = dcmtk(
        "storescu", "-aet", CALLING, "-aec", "GATEWAY", "127.0.0.1", str(node.port), str(path)
    )
    out = (proc.stdout + proc.stderr).lower()
    assert proc.returncode != 0 or "no presentation context" in out, out
    main_node.expect(lambda r: r["event_type"] == "association")
    assert not [r for r in main_node.new if r["event_type"] == "c-store"], main_node.new
    canary(node)


def test_deflated_transfer_syntax_not_accepted(main_node: Audited) -> None:
    node = main_node.node
    ae = scu(
        contexts=[
            (CTImageStorage, [DeflatedExplicitVRLittleEndian]),
            (VERIFICATION, [ExplicitVRLittleEndian]),
        ]
    )
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
        assert CTImageStorage not in accepted
        assert rejected.get(CTImageStorage) == 0x04  # transfer syntaxes not supported
    finally:
        assoc.release()
    main_node.expect(lambda r: r["event_type"] == "association" and r["outcome"] == "accepted")
    canary(node)


# --------------------------------------------------------------------------- data sets


def test_truncated_dataset_cannot_understand(
    main_node: Audited, tmp_path: Path, chunked_send: None
) -> None:
    node = main_node.node
    whole = make_instance(tmp_path / "whole.dcm", rows=128, cols=128)
    data = whole.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 10000])  # PixelData declares 32768 bytes
    uid = str(pydicom.dcmread(whole, stop_before_pixels=True).SOPInstanceUID)

    before = spooled(node)
    assert c_store(node, cut) == 0xC000
    recs = main_node.expect(lambda r: r["event_type"] == "c-store" and r["sop_instance_uid"] == uid)
    assert recs[0]["outcome"] == "failure"
    assert recs[0]["status"] == 0xC000
    assert recs[0]["detail"]["reason"] in ("dataset-truncated", "dataset-unparseable")
    assert_nothing_kept(node, before)
    canary(node)


def test_small_truncated_element_cannot_understand(
    main_node: Audited, tmp_path: Path, chunked_send: None
) -> None:
    """A last element too short to be deferred by the parser is a truncation too."""
    node = main_node.node
    whole = make_instance(tmp_path / "whole.dcm", rows=16, cols=16)  # 512-byte PixelData
    data = whole.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 100])
    uid = str(pydicom.dcmread(whole, stop_before_pixels=True).SOPInstanceUID)

    before = spooled(node)
    assert c_store(node, cut) == 0xC000
    recs = main_node.expect(lambda r: r["event_type"] == "c-store" and r["sop_instance_uid"] == uid)
    assert recs[0]["status"] == 0xC000
    assert recs[0]["detail"]["reason"] in ("dataset-truncated", "dataset-unparseable")
    assert_nothing_kept(node, before)
    canary(node)


@pytest.mark.parametrize("bad_uid", ["../../x", "1." + "2" * 68], ids=["dotdot", "70-chars"])
def test_hostile_sop_instance_uid_invalid_object_instance(
    main_node: Audited,
    tmp_path: Path,
    chunked_send: None,
    monkeypatch: pytest.MonkeyPatch,
    bad_uid: str,
) -> None:
    node = main_node.node
    # our SCU must be able to send what pynetdicom would refuse to put in a command set
    monkeypatch.setitem(_config.VALIDATORS, "UI", lambda _v: (True, ""))
    path = tmp_path / "hostile.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UI value
        save(build_instance(sop_instance_uid=bad_uid), path)
    assert pydicom.dcmread(path).SOPInstanceUID == bad_uid

    before = spooled(node)
    assert c_store(node, path) == 0x0117
    recs = main_node.expect(lambda r: r["event_type"] == "c-store" and r["status"] == 0x0117)
    assert recs[0]["outcome"] == "failure"
    assert recs[0]["sop_instance_uid"] == ""  # never recorded as a UID
    names = state_names(node)
    assert not [n for n in names if ".." in n or "x" == Path(n).name or bad_uid in n], names
    assert_nothing_kept(node, before)
    canary(node)


def test_affected_uid_differs_from_dataset_mismatch(
    main_node: Audited, tmp_path: Path, chunked_send: None
) -> None:
    node = main_node.node
    ds = build_instance()
    in_dataset = str(ds.SOPInstanceUID)
    in_command = generate_uid()
    # send_c_store(path) takes the command's AffectedSOPInstanceUID from the file meta;
    # enforce_file_format=True would rewrite it from the data set
    ds.file_meta.MediaStorageSOPInstanceUID = in_command
    ds.preamble = b"\x00" * 128
    path = tmp_path / "mismatch.dcm"
    ds.save_as(path, enforce_file_format=False)
    assert pydicom.dcmread(path).file_meta.MediaStorageSOPInstanceUID == in_command

    before = spooled(node)
    assert c_store(node, path) == 0xA900
    recs = main_node.expect(
        lambda r: r["event_type"] == "c-store" and r["sop_instance_uid"] == in_command
    )
    assert recs[0]["outcome"] == "failure"
    assert recs[0]["status"] == 0xA900
    assert recs[0]["detail"]["reason"] == "sop-instance-uid-differs-from-command"
    assert not [n for n in state_names(node) if in_dataset in n or in_command in n]
    assert_nothing_kept(node, before)
    canary(node)


def _nested_sequences(depth: int) -> bytes:
    """(0040,0275) SQ, undefined lengths, ``depth`` deep, a PatientName at the bottom."""
    open_sq = struct.pack("<HH", 0x0040, 0x0275) + b"SQ\x00\x00" + b"\xff\xff\xff\xff"
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    sq_end = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    name = struct.pack("<HH", 0x0010, 0x0010) + b"PN" + struct.pack("<H", 12) + b"DEEP^PATIENT"
    return (open_sq + item) * depth + name + (item_end + sq_end) * depth


def test_deep_sequence_nesting_refused_quickly(
    main_node: Audited, tmp_path: Path, chunked_send: None
) -> None:
    node = main_node.node
    ds = build_instance(PixelData=None)
    uid = str(ds.SOPInstanceUID)
    path = save(ds, tmp_path / "deep.dcm")
    with path.open("ab") as f:  # the highest tag in the data set is below (0040,0275)
        f.write(_nested_sequences(300))

    before = spooled(node)
    started = time.monotonic()
    status = c_store(node, path)
    elapsed = time.monotonic() - started
    assert status == 0xC000
    assert elapsed < 5.0
    recs = main_node.expect(lambda r: r["event_type"] == "c-store" and r["sop_instance_uid"] == uid)
    assert recs[0]["outcome"] == "failure"
    assert recs[0]["detail"]["reason"] in ("sequence-nesting-too-deep", "dataset-unparseable")
    assert "DEEP^PATIENT" not in node.log(10000)  # the planted PHI is not logged
    assert_nothing_kept(node, before)
    canary(node)


# --------------------------------------------------------------------------- raw PDUs


def test_associate_rq_declaring_4gib_aborted_after_header(main_node: Audited) -> None:
    node = main_node.node
    before_rss = rss_kib(node.pid)
    before_events = security_events(node)
    with connect(node) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0x00, 0xFFFFFFFF))
        elapsed, data = wait_closed(sock, 5.0)
    assert elapsed < 5.0
    assert is_abort_or_empty(data), data
    assert rss_kib(node.pid) - before_rss < 20 * 1024
    assert security_events(node) > before_events
    main_node.expect(
        lambda r: (
            r["event_type"] == "association"
            and r["outcome"] == "aborted"
            and r["detail"]["reason"] == "pdu-too-large type=0x01"
        )
    )
    canary(node)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(
            b"\xff" + random.Random(7).randbytes(255), "pdu-too-large type=0xff", id="random-ff"
        ),
        pytest.param(  # an unknown PDU type of a plausible length: pynetdicom's Evt19
            b"\xff\x00" + struct.pack(">L", 58) + random.Random(8).randbytes(58),
            "invalid-pdu",
            id="type-ff-small",
        ),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", "pdu-too-large type=0x47", id="http"),
    ],
)
def test_garbage_closed_and_counted(main_node: Audited, payload: bytes, reason: str) -> None:
    node = main_node.node
    before_rss = rss_kib(node.pid)
    before_events = security_events(node)
    with connect(node) as sock:
        sock.sendall(payload)
        _, data = wait_closed(sock, 5.0)
    assert is_abort_or_empty(data), data
    assert rss_kib(node.pid) - before_rss < 20 * 1024
    deadline = time.monotonic() + 3
    while security_events(node) <= before_events and time.monotonic() < deadline:
        time.sleep(0.1)
    assert security_events(node) > before_events
    recs = main_node.expect(
        lambda r: r["event_type"] == "association" and r["outcome"] == "aborted"
    )
    assert reason in [r["detail"]["reason"] for r in recs], recs
    canary(node)


def test_garbage_connections_free_their_slot_at_once(main_node: Audited) -> None:
    """More garbage connections than max_connections (64), each aborted at once: the next
    modality is served. Was: each kept a thread counted as a connection for acse_timeout
    (30 s) after its socket closed, so the echo below was closed at once."""
    node = main_node.node
    for _ in range(80):
        with connect(node) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
            _, data = wait_closed(sock, 5.0)
            assert is_abort_or_empty(data), data
    canary(node)


def test_pdata_larger_than_max_pdu_aborted(main_node: Audited) -> None:
    node = main_node.node
    before_events = security_events(node)
    with connect(node) as sock:
        sock.sendall(associate_rq())
        ac = read_pdu(sock)
        assert ac[:1] == b"\x02", ac  # A-ASSOCIATE-AC
        sock.sendall(struct.pack(">BBL", 0x04, 0x00, MAX_PDU + 4096) + b"\x00" * 4096)
        _, data = wait_closed(sock, 5.0)
    assert data[:1] == b"\x07", data  # A-ABORT
    assert security_events(node) > before_events
    recs = main_node.expect(
        lambda r: (
            r["event_type"] == "association"
            and r["outcome"] == "aborted"
            and r["calling_ae_title"] == CALLING
        )
    )
    assert recs[0]["detail"]["reason"] == "pdu-too-large type=0x04"
    canary(node)


def _associated(node: GatewayNode) -> socket.socket:
    sock = connect(node)
    sock.sendall(associate_rq())
    ac = read_pdu(sock)
    assert ac[:1] == b"\x02", ac  # A-ASSOCIATE-AC
    return sock


def test_endless_command_set_aborted_with_bounded_memory(main_node: Audited) -> None:
    """A7: command fragments whose last-fragment bit never comes (was: 686 MiB held in
    memory in 5 s, without bound)."""
    node = main_node.node
    before_rss = rss_kib(node.pid)
    sent = 0
    with _associated(node) as sock:
        fragment = p_data((1, 0x01, b"\x00" * 16000))  # command, not the last fragment
        started = time.monotonic()
        try:
            while time.monotonic() - started < 5.0:
                sock.sendall(fragment)
                sent += len(fragment)
        except (BrokenPipeError, ConnectionResetError):
            pass
        elapsed = time.monotonic() - started
        with contextlib.suppress(ConnectionResetError):
            _, data = wait_closed(sock, 5.0)
            assert is_abort_or_empty(data), data
    assert elapsed < 5.0, f"still accepting after {sent} bytes"
    assert sent < 8 << 20, sent
    assert rss_kib(node.pid) - before_rss < 20 * 1024
    recs = main_node.expect(
        lambda r: r["event_type"] == "association" and r["outcome"] == "aborted"
    )
    assert "dimse-message-too-large" in [r["detail"]["reason"] for r in recs], recs
    canary(node)


@pytest.mark.parametrize(
    "pdv",
    [
        pytest.param((1, 0x03, b"\xff" * 40), id="garbage-command"),
        pytest.param((1, 0x03, b"\x00" * 8), id="command-without-command-field"),
    ],
)
def test_undecodable_command_set_aborted(main_node: Audited, pdv: tuple[int, int, bytes]) -> None:
    """Was: pynetdicom's reactor thread died on the exception and the connection closed with
    no answer."""
    node = main_node.node
    with _associated(node) as sock:
        sock.sendall(p_data(pdv))
        _, data = wait_closed(sock, 5.0)
    assert data[:1] == b"\x07", data  # A-ABORT
    recs = main_node.expect(
        lambda r: r["event_type"] == "association" and r["outcome"] == "aborted"
    )
    assert "invalid-dimse-message" in [r["detail"]["reason"] for r in recs], recs
    log = node.log(200)
    assert "Exception in thread" not in log and "gateway.uncaught" not in log
    canary(node)


def test_slowloris_associate_closed_by_pdu_deadline(main_node: Audited) -> None:
    node = main_node.node
    rq = associate_rq()
    with connect(node) as sock:
        started = time.monotonic()
        sock.sendall(rq[:6])
        sock.settimeout(1.0)
        closed_after = None
        for byte in rq[6:20]:
            try:
                sock.sendall(bytes([byte]))
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            assert is_abort_or_empty(data), data
            closed_after = time.monotonic() - started
            break
    assert closed_after is not None, "still open after 14 s at 1 byte/s"
    assert closed_after < 4.5
    recs = main_node.expect(
        lambda r: r["event_type"] == "association" and r["outcome"] == "aborted"
    )
    assert any(r["detail"]["reason"] == "pdu-read-deadline" for r in recs), recs
    canary(node)


def test_idle_connections_do_not_block(main_node: Audited) -> None:
    node = main_node.node
    # from two other hosts, each within max_connections_per_address (32): what one host may
    # hold beyond that is closed at once (tests/e2e/test_connection_limits.py)
    idle = [connect(node, source=f"127.0.0.{2 + i % 2}") for i in range(50)]
    try:
        started = time.monotonic()
        canary(node)
        assert time.monotonic() - started < 5.0  # was ~6 s: 50 x 1 ms polls and context copies
    finally:
        for sock in idle:
            sock.close()
    main_node.expect(lambda r: r["event_type"] == "c-echo")
    canary(node)


# --------------------------------------------------------------------------- limits


def _assoc_response(node: GatewayNode) -> bytes:
    with connect(node) as sock:
        sock.sendall(associate_rq())
        return read_pdu(sock)


def test_association_limit_rejected_transient(strict_node: Audited) -> None:
    node = strict_node.node
    ae = scu(contexts=[(VERIFICATION, [ExplicitVRLittleEndian])])
    held = [ae.associate("127.0.0.1", node.port, ae_title=node.ae_title) for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        rj = _assoc_response(node)
        # A-ASSOCIATE-RJ: result 2 (transient), source 3 (provider, presentation), reason 2
        assert rj[0] == 0x03 and tuple(rj[7:10]) == (2, 3, 2), rj
    finally:
        for a in held:
            a.release()
    recs = strict_node.expect(
        lambda r: r["event_type"] == "association" and r["outcome"] == "rejected"
    )
    assert recs[0]["detail"]["reason"] == "association-limit"
    deadline = time.monotonic() + 5
    while (ac := _assoc_response(node))[0] != 0x02 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ac[0] == 0x02, ac
    canary(node)


# --------------------------------------------------------------------------- duplicates


def test_identical_duplicate_is_idempotent(main_node: Audited, tmp_path: Path) -> None:
    node = main_node.node
    path = make_instance(tmp_path / "dup.dcm")
    uid = str(pydicom.dcmread(path).SOPInstanceUID)
    before = spooled(node)
    assert c_store(node, path) == 0x0000
    assert c_store(node, path) == 0x0000
    assert len(spooled(node) - before) == 1  # one copy kept
    recs = main_node.expect(lambda r: r["event_type"] == "c-store" and r["sop_instance_uid"] == uid)
    assert [r["outcome"] for r in recs] == ["success", "success"]
    assert "duplicate" not in recs[0]["detail"]
    assert recs[1]["detail"]["duplicate"] == "identical"
    canary(node)


def test_different_duplicate_kept_by_default(main_node: Audited, tmp_path: Path) -> None:
    node = main_node.node
    uid = generate_uid()
    first = make_instance(tmp_path / "a.dcm", sop_instance_uid=uid, seed=1)
    second = make_instance(tmp_path / "b.dcm", sop_instance_uid=uid, seed=2)
    before = spooled(node)
    assert c_store(node, first) == 0x0000
    assert c_store(node, second) == 0x0000
    assert len(spooled(node) - before) == 2  # both versions kept
    recs = main_node.expect(lambda r: r["event_type"] == "c-store" and r["sop_instance_uid"] == uid)
    assert [r["outcome"] for r in recs] == ["success", "success"]
    assert recs[1]["detail"]["duplicate"] == "different-content-kept"
    assert recs[1]["detail"]["version"] == 2
    canary(node)


def test_different_duplicate_rejected_by_policy(strict_node: Audited, tmp_path: Path) -> None:
    node = strict_node.node
    uid = generate_uid()
    first = make_instance(tmp_path / "a.dcm", sop_instance_uid=uid, seed=1)
    second = make_instance(tmp_path / "b.dcm", sop_instance_uid=uid, seed=2)
    before = spooled(node)
    assert c_store(node, first) == 0x0000
    assert c_store(node, second) == 0x0111
    assert c_store(node, first) == 0x0000  # the first copy is still there: identical
    assert len(spooled(node) - before) == 1  # only the first kept
    recs = strict_node.expect(
        lambda r: r["event_type"] == "c-store" and r["sop_instance_uid"] == uid
    )
    assert [(r["outcome"], r["status"]) for r in recs] == [
        ("success", 0x0000),
        ("failure", 0x0111),  # one record per refused C-STORE
        ("success", 0x0000),
    ], recs
    assert recs[1]["detail"]["duplicate"] == "different-content-rejected"
    assert recs[2]["detail"]["duplicate"] == "identical"
    canary(node)
