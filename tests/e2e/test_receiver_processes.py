"""``dicom.receiver_processes``: receiver processes accepting on serve's listening sockets.

Real programs: DCMTK storescu and pynetdicom SCUs -> node (serve + one ``dicom-gateway
receiver``). Checked: concurrent associations are spread over both processes and every
instance is stored once, the receiver's counters on serve's metrics endpoint; the
association limit is the node's, counted across both (the association past it is rejected
transient, local limit, whichever process took it); a receiver SIGKILLed in the middle of
an association loses nothing it acknowledged, is audited and replaced, and the node goes on
serving; a SIGKILL of serve alone takes its receiver with it, and the node starts again on
the same port; the TLS listener is served by both processes (handshake, client certificate
bound to the calling AE title, storage); the audit chain verifies.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import ssl
import threading
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from tests.e2e.test_forward import storescu
from tests.e2e.test_tls import make_pki, tls_listener
from tests.support.datasets import make_ct_study, sop_instance_uids
from tests.support.node import GatewayNode, child_pid, process_gone
from tests.support.pdus import rejection, wait_closed

VERIFICATION = "1.2.840.10008.1.1"


def _node(root: Path, **dicom: object) -> GatewayNode:
    return GatewayNode(root, dicom={"receiver_processes": 2, **dicom}, worker={"enabled": False})


def _associate(node: GatewayNode, tls: ssl.SSLContext | None = None) -> Association:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    if tls is None:
        return ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert node.tls_port is not None
    return ae.associate(
        "127.0.0.1", node.tls_port, ae_title=node.ae_title, tls_args=(tls, "gateway-node")
    )


def _associations_by_process(node: GatewayNode) -> dict[int, int]:
    """Admitted associations per receiver process (0 is serve), from the node's ledger."""
    counts: dict[int, int] = {}
    for path in (node.state_dir / "receivers").glob("*.json"):
        try:
            held = json.loads(path.read_text())["associations"]
        except (OSError, ValueError):  # being replaced
            continue
        counts[int(path.stem)] = sum(held.values())
    return counts


def _wait_for_associations(node: GatewayNode, total: int) -> dict[int, int]:
    deadline = time.monotonic() + 10
    while True:
        counts = _associations_by_process(node)
        if sum(counts.values()) == total or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def _one_on_each_process(
    node: GatewayNode, tls: ssl.SSLContext | None = None
) -> dict[int, Association]:
    """An association held in serve (0) and one in the receiver (1): the least busy process
    takes a new connection first, so a few tries are enough (the surplus is released)."""
    held: dict[int, Association] = {}
    surplus: list[Association] = []
    for _ in range(8):
        before = _wait_for_associations(node, len(held) + len(surplus))
        assoc = _associate(node, tls)
        assert assoc.is_established, node.log()
        after = _wait_for_associations(node, len(held) + len(surplus) + 1)
        (process,) = [p for p in after if after[p] > before.get(p, 0)]
        (held if process not in held else {}).setdefault(process, assoc)
        if held.get(process) is not assoc:
            surplus.append(assoc)
        if len(held) == 2:
            break
    for assoc in surplus:
        assoc.release()
    assert sorted(held) == [0, 1], _associations_by_process(node)
    return held


def _stored_uids(node: GatewayNode) -> list[str]:
    db = node.state_dir / "index.sqlite3"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT sop_instance_uid FROM instances").fetchall()
    return [uid for (uid,) in rows]


def _received(metrics: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if re.match(r'gateway_instances_received_total\{.*outcome="stored"', line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _storescu_at_once(node: GatewayNode, files: list[Path], senders: int) -> None:
    """``senders`` storescu processes at once, each with its share of ``files``."""
    chunks = [files[i::senders] for i in range(senders)]
    threads = [threading.Thread(target=storescu, args=(node, chunk)) for chunk in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def _wait_received(node: GatewayNode, count: int) -> None:
    """serve's endpoint counts ``count`` stored instances, the receivers' included (their
    files are rewritten every second)."""
    deadline = time.monotonic() + 10
    while _received(node.metrics()) < count and time.monotonic() < deadline:
        time.sleep(0.3)
    assert _received(node.metrics()) == count, node.metrics()


def test_associations_spread_over_receivers_and_limited_across_them(tmp_path: Path) -> None:
    files = make_ct_study(tmp_path / "study", 24, seed=21)
    node = _node(tmp_path / "node", max_associations=3)
    with node:
        _storescu_at_once(node, files, 3)  # as many as the limit
        assert sorted(_stored_uids(node)) == sorted(sop_instance_uids(files))
        _wait_received(node, len(files))
        receiver_file = node.state_dir / "receiver-1-metrics.prom"
        assert _received(receiver_file.read_text()) > 0, "the receiver took no association"

        held = [_associate(node) for _ in range(3)]
        try:
            assert all(a.is_established for a in held), node.log()
            counts = _wait_for_associations(node, 3)
            assert sum(counts.values()) == 3 and min(counts.values()) >= 1, counts
            # past the node's limit, whichever process takes it: transient, local limit
            for _ in range(4):
                extra = _associate(node)
                assert not extra.is_established
                assert rejection(extra) == (2, 3, 2)
            # a place freed in one process is free for both
            held.pop(0).release()
            _wait_for_associations(node, 2)
            again = _associate(node)
            assert again.is_established, node.log()
            held.append(again)
        finally:
            for a in held:
                if a.is_established:
                    a.release()
        rows = node.cli_json("audit", "list", "--type", "association")
        assert sum(r["outcome"] == "rejected" for r in rows) >= 4, rows
    assert node.cli("audit", "verify").returncode == 0


def _connections_by_process(node: GatewayNode) -> dict[int, int]:
    counts: dict[int, int] = {}
    for path in (node.state_dir / "receivers").glob("*.json"):
        try:
            held = json.loads(path.read_text())["connections"]
        except (OSError, ValueError):
            continue
        counts[int(path.stem)] = sum(held.values())
    return counts


def test_connections_per_address_limited_across_receivers(tmp_path: Path) -> None:
    per_address = 4
    node = GatewayNode(
        tmp_path / "node",
        allow=[{"called_ae": "GATEWAY", "calling_ae": ["*"], "addresses": ["127.0.0.0/8"]}],
        dicom={"receiver_processes": 2, "max_connections_per_address": per_address},
        worker={"enabled": False},
    )
    with node:
        deadline = time.monotonic() + 10  # the start-up probe's connection is let go
        while sum(_connections_by_process(node).values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        address = ("127.0.0.1", node.port)
        held = []
        try:
            for _ in range(per_address):  # idle, as a flood or a stuck device leaves them
                held.append(socket.create_connection(address, timeout=5))
                time.sleep(0.1)  # counted before the next (the least busy process takes it)
            counts = _connections_by_process(node)
            assert sum(counts.values()) == per_address and min(counts.values()) >= 1, counts
            for _ in range(4):  # the next is closed at once, whichever process takes it
                extra = socket.create_connection(address, timeout=5)
                waited, data = wait_closed(extra, 3.0)
                extra.close()
                assert data == b"" and waited < 2.0, (waited, data)
            # another address is served meanwhile
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(VERIFICATION)
            assoc = ae.associate(
                "127.0.0.1", node.port, ae_title="GATEWAY", bind_address=("127.0.0.2", 0)
            )
            assert assoc.is_established, node.log()
            assert int(assoc.send_c_echo().Status) == 0
            assoc.release()
        finally:
            for sock in held:
                sock.close()
        # counted by whichever process closed it (a receiver's file is rewritten every second)
        limit = 'gateway_security_events_total{kind="connection-limit-per-address"} 4.0'
        deadline = time.monotonic() + 10
        while limit not in node.metrics() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert limit in node.metrics(), node.metrics()


def _send_until_killed(
    assoc: Association, files: list[Path], acknowledged: list[str], stop: threading.Event
) -> None:
    for path in files:
        if stop.is_set() or not assoc.is_established:
            return
        ds = dcmread(path)
        try:
            status = assoc.send_c_store(ds)
        except RuntimeError:  # ended (its process killed) since the check above
            return
        if "Status" in status and int(status.Status) == 0:
            acknowledged.append(str(ds.SOPInstanceUID))


def test_receiver_killed_mid_association_loses_nothing_acknowledged(tmp_path: Path) -> None:
    files = make_ct_study(tmp_path / "study", 120, seed=22)
    node = _node(tmp_path / "node")
    with node:
        receiver = child_pid(node, "receiver")
        on = _one_on_each_process(node)
        assocs = [on[0], on[1]]  # serve's, the receiver's
        acknowledged: list[list[str]] = [[], []]
        stop = threading.Event()
        senders = [
            threading.Thread(
                target=_send_until_killed, args=(a, files[i::2], acknowledged[i], stop)
            )
            for i, a in enumerate(assocs)
        ]
        for t in senders:
            t.start()
        deadline = time.monotonic() + 30
        while min(map(len, acknowledged)) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(receiver, signal.SIGKILL)  # in the middle of its association's C-STOREs
        assert process_gone(receiver, 5)
        for t in senders:
            t.join(60)
        for a in assocs:
            if a.is_established:
                a.release()
        # serve's association went on to its end; the receiver's ended with the process
        assert len(acknowledged[0]) == len(files[0::2]), node.log()
        assert len(acknowledged[1]) < len(files[1::2])
        done = set(acknowledged[0]) | set(acknowledged[1])
        stored = _stored_uids(node)
        assert done <= set(stored), "an acknowledged instance is not in the index"
        assert len(stored) == len(set(stored))

        replacement = child_pid(node, "receiver", exclude=[receiver])
        assert replacement != receiver
        # the node serves on, on both processes: everything sent again is stored once
        _storescu_at_once(node, files, 4)
        assert sorted(_stored_uids(node)) == sorted(sop_instance_uids(files))
        rows = node.cli_json("audit", "list", "--type", "application")
    exited = [r for r in rows if r["outcome"] == "receiver-exited"]
    assert len(exited) == 1, rows
    assert node.cli("audit", "verify").returncode == 0


def test_receivers_on_postgresql(tmp_path: Path, pg_schema_url: tuple[str, str]) -> None:
    """The production index: serve and two receivers writing instances and the audit chain
    at once (row locks instead of SQLite's one writer)."""
    files = make_ct_study(tmp_path / "study", 24, seed=25)
    node = GatewayNode(
        tmp_path / "node",
        database_url=pg_schema_url[0],
        dicom={"receiver_processes": 3},
        worker={"enabled": False},
    )
    with node:
        _storescu_at_once(node, files, 4)
        rows = node.cli_json("audit", "list", "--type", "c-store", "--limit", "1000")
        stored = {r["sop_instance_uid"] for r in rows if r["outcome"] == "success"}
        assert stored == set(sop_instance_uids(files))
        _wait_received(node, len(files))
    assert node.cli("audit", "verify").returncode == 0


def test_serve_killed_takes_its_receivers_with_it(tmp_path: Path) -> None:
    files = make_ct_study(tmp_path / "study", 8, seed=23)
    node = _node(tmp_path / "node")
    with node:
        receiver = child_pid(node, "receiver")
        os.kill(node.pid, signal.SIGKILL)  # serve alone, not its process group
        assert process_gone(receiver, 5), "the receiver outlived serve"
        node.proc.wait(10)  # type: ignore[union-attr]
        node.proc = None
    with node:  # the same port: no receiver of the killed serve holds it
        storescu(node, files)
        assert sorted(_stored_uids(node)) == sorted(sop_instance_uids(files))
    assert node.cli("audit", "verify").returncode == 0


def test_tls_listener_served_by_every_receiver(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    files = make_ct_study(tmp_path / "study", 2, seed=24)
    node = GatewayNode(
        tmp_path / "node",
        dicom={"receiver_processes": 2, **tls_listener(pki)},
        worker={"enabled": False},
    )
    client = ssl.create_default_context(cafile=str(pki.ca))
    client.load_cert_chain(str(pki.modality.cert_file), str(pki.modality.key_file))
    rogue = ssl.create_default_context(cafile=str(pki.ca))
    rogue.load_cert_chain(str(pki.rogue.cert_file), str(pki.rogue.key_file))
    with node:
        on = _one_on_each_process(node, client)
        try:
            for process, path in zip((0, 1), files[:2], strict=True):
                status = on[process].send_c_store(dcmread(path))
                assert int(status.Status) == 0, (process, status)
        finally:
            for assoc in on.values():
                assoc.release()
        # a certificate of another CA is refused whichever process takes it
        for _ in range(4):
            assert not _associate(node, rogue).is_established
        assert sorted(_stored_uids(node)) == sorted(sop_instance_uids(files[:2]))
