"""Durability end to end: real node processes, real Orthanc and DCMTK, loopback only.

Orthanc down while a study arrives, SIGKILL of the node in the middle of an ingest and in
the middle of a forward, a full spool filesystem, a tampered audit log, the queue CLI, and
the forward and retry flows on PostgreSQL.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.support.datasets import make_ct_study, sha256_pixel, sop_instance_uids
from tests.support.node import GATEWAY, GatewayNode
from tests.support.peers import Orthanc, dcmtk, dcmtk_path
from tests.support.pg import pg_conninfo

OUT_OF_RESOURCES = 0xA700


# --------------------------------------------------------------------------- helpers


def destination(orthanc: Orthanc, name: str = "pacs") -> dict[str, Any]:
    return {
        "name": name,
        "ae_title": orthanc.aet,
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
        "connect_timeout": 2,
    }


def route(quiet: float = 1, dest: str = "pacs") -> dict[str, Any]:
    return {"name": "all", "destinations": [dest], "quiet_seconds": quiet}


def storescu(node: GatewayNode, files: list[Path], *extra: str) -> None:
    proc = dcmtk(
        "storescu",
        "-aet",
        "MODALITY",
        "-aec",
        node.ae_title,
        *extra,
        "127.0.0.1",
        str(node.port),
        *[str(f) for f in files],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def wait_until(what: str, check: Callable[[], bool], timeout: float, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def spool_keys(node: GatewayNode) -> set[str]:
    return {p.stem for p in (node.state_dir / "spool" / "objects").glob("*/*.dcm")}


def index_keys(node: GatewayNode) -> set[str]:
    con = sqlite3.connect(node.state_dir / "index.sqlite3")
    try:
        return {row[0] for row in con.execute("SELECT spool_key FROM instances")}
    finally:
        con.close()


def index_deliveries(node: GatewayNode) -> list[dict[str, Any]]:
    """The deliveries, read from a SQLite index directly (the CLI takes ~2 s to start)."""
    con = sqlite3.connect(node.state_dir / "index.sqlite3")
    try:
        rows = con.execute("SELECT id, state, attempts, sent_count FROM deliveries").fetchall()
    finally:
        con.close()
    return [{"id": i, "state": st, "attempts": a, "sent": n} for i, st, a, n in rows]


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def assert_orthanc_holds(orthanc: Orthanc, files: list[Path], *, pixels: bool = False) -> None:
    """Orthanc holds exactly these instances, each once (and, optionally, same pixels)."""
    held = orthanc.sop_instance_uids()
    assert len(held) == len(set(held)), "Orthanc holds a SOP Instance UID twice"
    assert held == sop_instance_uids(files)
    assert orthanc.count_instances() == len(files)
    if pixels:
        for f in files:
            data = orthanc.instance_file(orthanc.instance_id_for_uid(uid_of(f)))
            assert sha256_pixel(data) == sha256_pixel(f), f


def c_store(node: GatewayNode, paths: list[Path]) -> list[int]:
    """C-STORE with pynetdicom; the status of each instance (-1: none in the response)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    out = []
    try:
        for p in paths:
            status = assoc.send_c_store(pydicom.dcmread(p))
            out.append(int(status.Status) if "Status" in status else -1)
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def c_echo(node: GatewayNode) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else -1
    finally:
        assoc.release()


def all_delivered(node: GatewayNode, n: int) -> bool:
    rows = index_deliveries(node)
    if not rows or any(r["state"] != "delivered" for r in rows):
        return False
    return sum(r["sent"] for r in rows) >= n


def parse_storescu(text: str) -> tuple[set[str], list[str]]:
    """Files that storescu -v saw answered with Success, and every file it began to send."""
    acked: set[str] = set()
    begun: list[str] = []
    current = ""
    for line in text.splitlines():
        if "Sending file: " in line:
            current = line.split("Sending file: ", 1)[1].strip()
            begun.append(current)
        elif "Received Store Response (Success)" in line:
            assert current
            acked.add(current)
    return acked, begun


# --------------------------------------------------------------------------- PostgreSQL


def pg_tables(pg_url: str, schema: str) -> set[str]:
    import psycopg

    with psycopg.connect(pg_conninfo(pg_url)) as con:
        rows = con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (schema,),
        ).fetchall()
    return {r[0] for r in rows}


# --------------------------------------------------------------------------- 1. Orthanc down


def _orthanc_down_then_up(tmp_path: Path, database_url: str = "") -> None:
    files = make_ct_study(tmp_path / "study", 10, seed=11)
    orthanc = Orthanc(tmp_path, aet="ORTHANC")  # not started: its port refuses
    node = GatewayNode(
        tmp_path / "node",
        destinations=[destination(orthanc)],
        routes=[route(quiet=0.5)],
        database_url=database_url,
        worker={"max_attempts": 100, "backoff_max": 1},
    )
    try:
        with node:
            storescu(node, files)

            def retrying() -> bool:
                rows = node.deliveries()
                return bool(rows) and rows[0]["state"] == "retry_wait" and rows[0]["attempts"] > 1

            wait_until("a delivery in retry_wait with attempts > 1", retrying, 30)
            row = node.deliveries()[0]
            assert row["sent"] == 0 and row["last_error"]
            started = time.monotonic()
            orthanc.start()
            delivered = node.wait_for_deliveries("delivered", 1, timeout=60)
            print(f"delivered {time.monotonic() - started:.1f}s after Orthanc started")
            assert delivered[0]["sent"] == 10
            assert delivered[0]["attempts"] > 2
            assert_orthanc_holds(orthanc, files)
            assert node.cli("audit", "verify").returncode == 0
    finally:
        orthanc.kill()


def test_orthanc_down_while_study_arrives(tmp_path: Path) -> None:
    _orthanc_down_then_up(tmp_path)


# --------------------------------------------------------------------------- 2. kill in ingest


def test_sigkill_during_ingest(tmp_path: Path, orthanc: Orthanc) -> None:
    total = 500
    files = make_ct_study(tmp_path / "study", total, seed=21)
    node = GatewayNode(
        tmp_path / "node",
        destinations=[destination(orthanc)],
        routes=[route(quiet=1)],
    )
    node.start()
    out_path = tmp_path / "storescu.out"
    with out_path.open("wb") as out:
        scu = subprocess.Popen(
            [
                dcmtk_path("storescu"),
                "-v",
                "-aet",
                "MODALITY",
                "-aec",
                node.ae_title,
                "127.0.0.1",
                str(node.port),
                *[str(f) for f in files],
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    try:
        started = time.monotonic()
        wait_until("200 instances in the spool", lambda: len(spool_keys(node)) >= 200, 60, 0.01)
        elapsed = time.monotonic() - started
        node.kill()
        scu.wait(30)
        print(f"ingest: {len(spool_keys(node))} instances spooled in {elapsed:.2f}s, SIGKILL")
    finally:
        if scu.poll() is None:
            scu.kill()
            scu.wait()
    acked, begun = parse_storescu(out_path.read_text())
    assert scu.returncode != 0, "storescu should have lost its association"
    assert 150 <= len(acked) < total, len(acked)
    assert len(begun) < total

    node.start()
    try:
        # recovery: no spool file the index does not name, no named file missing
        assert spool_keys(node) == index_keys(node)
        assert len(index_keys(node)) >= len(acked)
        not_acked = [f for f in files if str(f) not in acked]
        again = [f for f in files if str(f) in acked][:5]  # idempotent: identical bytes
        resent = time.monotonic()
        storescu(node, not_acked + again)
        wait_until("every instance delivered", lambda: all_delivered(node, total), 120, 0.1)
        print(f"re-sent {len(not_acked + again)}, all delivered {time.monotonic() - resent:.1f}s")
        assert_orthanc_holds(orthanc, files, pixels=True)
        verify = node.cli("audit", "verify")
        assert verify.returncode == 0, verify.stderr
    finally:
        node.stop()
    keys = index_keys(node)
    assert spool_keys(node) == keys
    assert len(keys) == total


# --------------------------------------------------------------------------- 3. kill in forward


def test_sigkill_during_forward(tmp_path: Path, orthanc: Orthanc) -> None:
    """The restarted node takes the killed run's delivery again at once, not after its lease
    (ten minutes here) runs out; a second serve on the same state directory is refused."""
    total = 400
    files = make_ct_study(tmp_path / "study", total, seed=31)
    node = GatewayNode(
        tmp_path / "node",
        destinations=[destination(orthanc)],
        routes=[route(quiet=0.5)],
        worker={"lease_seconds": 600},
    )
    node.start()
    try:
        second = subprocess.run(
            [GATEWAY, "serve", "-c", str(node.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1, second.stderr
        assert f"serve.lock: another dicom-gateway serve (pid {node.pid})" in second.stderr
        assert c_echo(node) == 0x0000  # the first goes on serving
        storescu(node, files)
        wait_until("Orthanc to hold some", lambda: orthanc.count_instances() >= 40, 60, 0.02)
        node.kill()
        held = orthanc.count_instances()
        print(f"SIGKILL with {held}/{total} instances in Orthanc")
        assert 0 < held < total
        rows = node.deliveries()
        assert len(rows) == 1 and rows[0]["state"] == "in_progress", rows

        restarted = time.monotonic()
        node.start()
        delivered = node.wait_for_deliveries("delivered", 1, timeout=90)
        print(f"delivered {time.monotonic() - restarted:.1f}s after the restart")
        assert delivered[0]["sent"] == total
        assert delivered[0]["attempts"] == 2
        shown = node.cli_json("queue", "show", delivered[0]["id"])
        assert len(shown["items"]) == total
        assert {i["state"] for i in shown["items"]} == {"sent"}
        assert_orthanc_holds(orthanc, files)
        assert node.cli("audit", "verify").returncode == 0
    finally:
        node.kill()


# --------------------------------------------------------------------------- 4. full spool


def test_spool_on_full_filesystem(tmp_path: Path) -> None:
    root = tmp_path / "node"
    spool = root / "state" / "spool"
    spool.mkdir(parents=True)
    mount = f'mount -t tmpfs -o size=20m tmpfs {spool} && exec "$0" "$@"'
    node = GatewayNode(
        root,
        database_url=f"sqlite:///{tmp_path / 'index' / 'index.sqlite3'}",
        wrapper=["unshare", "-m", "--propagation", "private", "bash", "-c", mount],
    )
    files = make_ct_study(tmp_path / "study", 42, seed=41)
    with node:
        # the spool as the node sees it, through its own mount namespace
        seen = Path(f"/proc/{node.pid}/root") / spool.relative_to("/")
        assert not list(spool.iterdir()), "the tmpfs must be the node's only"
        assert c_store(node, files[:2]) == [0, 0]
        # leave a little room: a few instances fit, then the filesystem is full
        vfs = os.statvfs(seen)
        filler = seen / "filler"
        filler.write_bytes(b"\0" * (vfs.f_bavail * vfs.f_frsize - 150 * 1024))
        statuses = c_store(node, files[2:40])
        print(f"statuses on a filling spool: {[hex(s) for s in statuses]}")
        assert OUT_OF_RESOURCES in statuses, statuses
        first_full = statuses.index(OUT_OF_RESOURCES)
        assert first_full > 0 and set(statuses[:first_full]) == {0}
        assert node.proc is not None and node.proc.poll() is None, "node crashed"
        assert c_echo(node) == 0
        audit = node.cli_json("audit", "list", "--type", "c-store")
        failures = [a for a in audit if a["outcome"] == "failure"]
        assert len(failures) == statuses.count(OUT_OF_RESOURCES)
        assert {a["status"] for a in failures} == {OUT_OF_RESOURCES}
        assert {a["detail"]["reason"] for a in failures} == {"spool-full"}
        filler.unlink()
        assert c_store(node, files[40:42]) == [0, 0]
        assert not list((seen / "incoming").iterdir()), "refused buffers left behind"
        assert node.cli("audit", "verify").returncode == 0


def test_spool_high_water_mark(tmp_path: Path) -> None:
    node = GatewayNode(tmp_path / "node", ingest={"spool_min_free_bytes": 1 << 62})
    files = make_ct_study(tmp_path / "study", 2, seed=42)
    with node:
        assert c_store(node, files) == [OUT_OF_RESOURCES, OUT_OF_RESOURCES]
        assert c_echo(node) == 0
        assert not spool_keys(node)
        audit = node.cli_json("audit", "list", "--type", "c-store")
        assert [a["status"] for a in audit] == [OUT_OF_RESOURCES, OUT_OF_RESOURCES]
        assert {a["detail"]["reason"] for a in audit} == {"spool-full"}


# --------------------------------------------------------------------------- 5. audit tamper


def test_audit_tampering_detected(tmp_path: Path) -> None:
    node = GatewayNode(tmp_path / "node")
    with node:
        storescu(node, make_ct_study(tmp_path / "study", 5, seed=51))
    ok = node.cli("audit", "verify")
    assert ok.returncode == 0, ok.stderr
    db = node.state_dir / "index.sqlite3"
    pristine = sqlite3.connect(":memory:")
    con = sqlite3.connect(db)
    con.backup(pristine)
    con.close()

    def tampered(*statements: str) -> subprocess.CompletedProcess[str]:
        con = sqlite3.connect(db)
        try:
            pristine.backup(con)
            for s in statements:
                con.execute(s)
            con.commit()
        finally:
            con.close()
        return node.cli("audit", "verify")

    edited = tampered("UPDATE audit_events SET outcome='x' WHERE seq=3")
    assert edited.returncode == 1
    assert "row 3" in edited.stderr, edited.stderr

    deleted = tampered("DELETE FROM audit_events WHERE seq=4")
    assert deleted.returncode == 1
    assert "row 4" in deleted.stderr, deleted.stderr

    cols = (
        "recorded_at, event_type, outcome, node, calling_ae_title, called_ae_title, address, "
        "sop_class_uid, sop_instance_uid, study_instance_uid, delivery_id, status, detail, "
        "prev_hash, hash"
    )
    swapped = tampered(
        f"CREATE TEMP TABLE t AS SELECT seq, {cols} FROM audit_events WHERE seq IN (3, 5)",
        f"UPDATE audit_events SET ({cols}) = (SELECT {cols} FROM t WHERE t.seq = 5) WHERE seq=3",
        f"UPDATE audit_events SET ({cols}) = (SELECT {cols} FROM t WHERE t.seq = 3) WHERE seq=5",
    )
    assert swapped.returncode == 1
    assert "row 3" in swapped.stderr, swapped.stderr

    assert tampered().returncode == 0  # the restored chain verifies again


# --------------------------------------------------------------------------- queue CLI


def test_queue_cli_retry_and_cancel(tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path, aet="ORTHANC")  # its port refuses until started
    node = GatewayNode(
        tmp_path / "node",
        destinations=[destination(orthanc)],
        routes=[route(quiet=0.3)],
        worker={"max_attempts": 2, "backoff_initial": 3, "backoff_max": 3},
    )
    first = make_ct_study(tmp_path / "s1", 3, seed=61)
    second = make_ct_study(tmp_path / "s2", 3, seed=62)
    try:
        with node:
            storescu(node, first)
            wait_until(
                "a failed delivery",
                lambda: [r["state"] for r in index_deliveries(node)] == ["failed"],
                30,
                0.05,
            )
            failed = node.cli_json("queue", "list")[0]
            assert failed["attempts"] == 2 and failed["sent"] == 0
            listed = node.cli_json("queue", "list", "--state", "failed")
            assert [r["id"] for r in listed] == [failed["id"]]
            shown = node.cli_json("queue", "show", failed["id"])
            assert len(shown["items"]) == 3
            assert [a["outcome"] for a in shown["attempt_log"]] == [
                "retryable_failure",
                "attempts_exhausted",
            ]

            orthanc.start()
            retried = node.cli_json("queue", "retry", failed["id"])
            assert retried["state"] == "pending" and retried["attempts"] == 0
            node.wait_for_deliveries("delivered", 1, timeout=30)
            assert_orthanc_holds(orthanc, first)

            # a delivered delivery can be neither retried nor cancelled
            assert node.cli("queue", "retry", failed["id"], "--json").returncode == 1
            assert node.cli("queue", "cancel", failed["id"], "--json").returncode == 1
            assert node.cli("queue", "show", "nope", "--json").returncode == 1

            orthanc.kill()
            storescu(node, second)

            waiting: list[dict[str, Any]] = []

            def retry_wait() -> bool:
                waiting[:] = [r for r in index_deliveries(node) if r["state"] == "retry_wait"]
                return bool(waiting)

            wait_until("a delivery in retry_wait", retry_wait, 30, 0.05)
            target = waiting[0]
            cancelled = node.cli_json("queue", "cancel", target["id"])
            assert cancelled["state"] == "cancelled"
            time.sleep(3.5)  # past its backoff: a cancelled delivery is not attempted again
            shown = node.cli_json("queue", "show", target["id"])
            assert shown["state"] == "cancelled" and shown["attempts"] == 1
            assert len(shown["attempt_log"]) == 1
            assert node.cli("audit", "verify").returncode == 0
    finally:
        orthanc.kill()


# --------------------------------------------------------------------------- 6. PostgreSQL


def test_forward_on_postgresql(
    tmp_path: Path, orthanc: Orthanc, pg_url: str, pg_schema_url: tuple[str, str]
) -> None:
    url, schema = pg_schema_url
    files = make_ct_study(tmp_path / "study", 50, seed=71)
    node = GatewayNode(
        tmp_path / "node",
        destinations=[destination(orthanc)],
        routes=[route(quiet=0.5)],
        database_url=url,
    )
    with node:
        storescu(node, files)
        delivered = node.wait_for_deliveries("delivered", 1, timeout=60)
        assert delivered[0]["sent"] == 50
    assert not (node.state_dir / "index.sqlite3").exists()
    tables = pg_tables(pg_url, schema)
    assert {"alembic_version", "audit_events", "deliveries", "instances"} <= tables, tables
    assert_orthanc_holds(orthanc, files, pixels=True)
    assert node.cli("audit", "verify").returncode == 0


def test_orthanc_down_on_postgresql(tmp_path: Path, pg_schema_url: tuple[str, str]) -> None:
    _orthanc_down_then_up(tmp_path, database_url=pg_schema_url[0])
