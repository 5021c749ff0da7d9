"""Graceful stop under load (FAULTS F17): SIGTERM while 10 associations are storing.

New associations are refused with A-ASSOCIATE-RJ transient (2, 3, 1: temporary
congestion) and audited; associations in progress either finish or are aborted within the
grace period (10 s); the node exits 0; after a restart every instance that was answered
0x0000 is in the index and the spool, the spool holds nothing else, and the audit verifies.
The same with two receiver processes (``dicom.receiver_processes``), whichever process holds
an association or takes a new one.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from tests.support.datasets import make_ct_study
from tests.support.node import GatewayNode
from tests.support.pdus import associate_rq, read_pdu

GRACE = 10.0  # gateway.app.Node.stop's grace period


@dataclass
class Sender:
    files: list[Path]
    pause: float
    endless: bool  # keeps sending until the association ends
    acked: list[str] = field(default_factory=list)
    established: threading.Event = field(default_factory=threading.Event)
    outcome: str = ""
    ended_at: float = 0.0

    def run(self, port: int) -> None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        # pynetdicom's send_c_store waits for its response for the whole DIMSE timeout even
        # when the connection has closed under it (the node's abort at the end of the grace
        # period came after the request, before its answer): the closing wakes it here
        assoc = ae.associate(
            "127.0.0.1", port, ae_title="GATEWAY", evt_handlers=[(evt.EVT_CONN_CLOSE, _woken)]
        )
        if not assoc.is_established:
            self.outcome, self.ended_at = "not established", time.monotonic()
            return
        self.established.set()
        i = 0
        answered = True
        while assoc.is_established and (self.endless or i < len(self.files)):
            path = self.files[i % len(self.files)]
            rsp = assoc.send_c_store(path)
            if "Status" not in rsp:
                answered = False  # no answer: the association is going down
                break
            if int(rsp.Status) != 0:
                self.outcome = f"status 0x{int(rsp.Status):04X}"
                break
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            self.acked.append(str(uid))
            i += 1
            time.sleep(self.pause)
        if not answered:  # let pynetdicom finish taking the association down
            deadline = time.monotonic() + 5
            while assoc.is_established and time.monotonic() < deadline:
                time.sleep(0.01)
        if assoc.is_established:
            assoc.release()
            self.outcome = self.outcome or "released"
        else:
            self.outcome = self.outcome or ("aborted" if assoc.is_aborted else "closed")
        self.ended_at = time.monotonic()


def _woken(event: Any) -> None:
    """An empty answer for a sender waiting for its response on a closed connection."""
    event.assoc.dimse.msg_queue.put((None, None))


@pytest.mark.parametrize("receivers", [1, 2])
def test_sigterm_during_ten_concurrent_stores(tmp_path: Path, receivers: int) -> None:
    node = GatewayNode(
        tmp_path / "node",
        dicom={
            "max_associations": 20,
            "max_associations_per_address": 20,
            "receiver_processes": receivers,
        },
    )
    senders = [
        Sender(make_ct_study(tmp_path / f"s{i}", 12 if i < 8 else 40, seed=170 + i), 0.1, False)
        if i < 8
        else Sender(make_ct_study(tmp_path / f"s{i}", 40, seed=170 + i), 0.3, True)
        for i in range(10)
    ]
    node.start()
    threads = [threading.Thread(target=s.run, args=(node.port,), daemon=True) for s in senders]
    try:
        for t in threads:
            t.start()
        for s in senders:
            assert s.established.wait(30), "an association was not established"
        deadline = time.monotonic() + 30
        while any(not s.acked for s in senders) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert all(s.acked for s in senders)
        in_flight = sum(1 for s in senders if not s.ended_at)
        assert in_flight == 10, "all ten must be storing when SIGTERM comes"

        proc = node.proc
        assert proc is not None
        os.killpg(proc.pid, signal.SIGTERM)
        term = time.monotonic()
        # new associations during the grace period: A-ASSOCIATE-RJ, transient
        rejects = []
        time.sleep(0.3)
        while time.monotonic() < term + GRACE - 2 and any(not s.ended_at for s in senders):
            with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
                sock.sendall(associate_rq())
                rejects.append(read_pdu(sock))
            time.sleep(0.5)
        assert rejects, "no association was attempted during the grace period"
        for rj in rejects:
            # A-ASSOCIATE-RJ: result 2 (transient), source 3 (provider), reason 1
            assert rj[0] == 0x03 and tuple(rj[7:10]) == (2, 3, 1), rj

        for t in threads:
            t.join(GRACE + 10)
        assert proc.wait(GRACE + 10) == 0, node.log()
        stopped = time.monotonic() - term
    finally:
        node.kill()
    print(f"stopped {stopped:.1f}s after SIGTERM; {len(rejects)} new associations refused")
    for i, s in enumerate(senders):
        print(f"  sender {i}: {s.outcome}, {len(s.acked)} acked, ended {s.ended_at - term:.1f}s")
    short, endless = senders[:8], senders[8:]
    # in-flight associations finish (the short ones have time to) or are aborted at the end
    for s in short:
        assert s.outcome == "released" and len(s.acked) == len(s.files), (s.outcome, len(s.acked))
    for s in endless:
        assert s.outcome in ("aborted", "closed"), s.outcome
    for s in senders:
        assert s.ended_at - term < GRACE + 3, "an association outlived the grace period"
    assert stopped < GRACE + 5, node.log(400)  # a child past its grace wrote its stacks

    # acknowledged means durable: after a restart every acknowledged instance is there
    node.start()
    try:
        con = sqlite3.connect(node.state_dir / "index.sqlite3")
        try:
            indexed = {r[0] for r in con.execute("SELECT sop_instance_uid FROM instances")}
            keys = {r[0] for r in con.execute("SELECT spool_key FROM instances")}
        finally:
            con.close()
        acked = {uid for s in senders for uid in s.acked}
        assert acked <= indexed, f"{len(acked - indexed)} acknowledged instances lost"
        spooled = {p.stem for p in (node.state_dir / "spool" / "objects").glob("*/*.dcm")}
        assert spooled == keys
        assert not list((node.state_dir / "spool" / "incoming").iterdir())
        verify = node.cli("audit", "verify")
        assert verify.returncode == 0, verify.stderr
        audit = node.cli_json("audit", "list", "--type", "association")
        refused = [
            a
            for a in audit
            if a["outcome"] == "rejected" and a["detail"].get("reason") == "node-stopping"
        ]
        assert len(refused) == len(rejects)
    finally:
        node.stop()
