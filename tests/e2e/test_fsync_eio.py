"""FAULTS F7: an fsync that fails with EIO ("fsyncgate").

strace attaches to the running node and makes the Nth fsync after the attach fail with EIO.
With the node idle, the syncs of one C-STORE association come in a fixed order: the
association's audit commit (SQLite's fdatasync of its WAL), then for the instance the fsync of
the receive file and of its spool folder, and the commit of the index and audit rows
(fdatasync). Which file the injected error hit is
read back from strace's log (``-y`` prints the path of every fd), so a changed order fails the
test instead of testing something else.

Expected: the instance is answered 0xA700 and never acknowledged; the file whose fsync failed
is never fsync'd again nor renamed into ``objects/`` (it is discarded); the spool is marked
unhealthy (audit row, ``gateway_spool_healthy`` 0) and refuses stores until a probe succeeds
after ``spool_probe_interval``; the node keeps answering (echo) and then stores again.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.test_bad_input import Audited, c_store, canary, scu
from tests.support.datasets import make_ct_study, sop_instance_uids
from tests.support.node import GatewayNode

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")

FSYNC = re.compile(r"\bf(?:data)?sync\((?P<fd>\d+)<(?P<path>[^>]*)>\)\s+=\s+(?P<result>.*)$")
PROBE_INTERVAL = 6.0


def metric(node: GatewayNode, name: str) -> float:
    for line in node.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


class Strace:
    """strace attached to every thread of the node, failing its Nth fsync with EIO."""

    def __init__(self, pid: int, log: Path, syscall: str, when: int) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [
                "strace",
                "-f",
                "-y",
                "-o",
                str(log),
                "-e",
                "trace=fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat",
                "-e",
                f"inject={syscall}:error=EIO:when={when}",
                "-p",
                str(pid),
            ],
            stderr=subprocess.PIPE,
        )
        # strace says "Process N attached" on stderr once it holds the process; -f then
        # attaches every other thread of it before it lets the process go on
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline().decode(errors="replace")
        assert "attached" in line, f"strace did not attach: {line}"

    def detach(self) -> list[str]:
        self.proc.send_signal(signal.SIGINT)  # detaches and flushes its log
        self.proc.wait(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return self.log.read_text().splitlines()


def fsyncs(lines: list[str]) -> list[tuple[str, str]]:
    out = []
    for line in lines:
        m = FSYNC.search(line)
        if m:
            out.append((m["path"], m["result"]))
    return out


def prepare_spool_folders(node: GatewayNode) -> None:
    """Every objects/xx folder exists already, so no mkdir's folder fsync shifts the count."""
    objects = node.state_dir / "spool" / "objects"
    for i in range(256):
        (objects / f"{i:02x}").mkdir(parents=True, exist_ok=True)


@pytest.mark.parametrize(
    ("syscall", "when", "target"),
    [
        ("fsync", 1, "received file"),
        ("fsync", 2, "spool folder"),
        # SQLite commits with fdatasync; the instance's rows are committed on a helper thread
        # of the ingest, whose first traced fdatasync that is
        ("fdatasync", 1, "index commit"),
    ],
)
def test_fsync_eio_refuses_discards_and_recovers(
    tmp_path: Path, syscall: str, when: int, target: str
) -> None:
    files = make_ct_study(tmp_path / "study", 5, seed=70 + when + len(syscall))
    uids = [sop_instance_uids([f])[0] for f in files]
    node = GatewayNode(
        tmp_path / "node",
        worker={"enabled": False},
        ingest={"spool_probe_interval": PROBE_INTERVAL},
    )
    prepare_spool_folders(node)
    with node:
        audited = Audited(node)
        # warm: the first stores' one-off work. The ingest keeps an index connection between
        # its transactions, so the second association's audit opens the pool's second one,
        # whose first commit also syncs the folder of the WAL (SQLite does, once per
        # connection): the EIO must not land there
        for warm in (files[0], files[4]):
            assert c_store(node, warm) == 0x0000
            audited.expect(lambda r: r["event_type"] == "c-store" and r["outcome"] == "success")
        objects = node.state_dir / "spool" / "objects"
        before = {p for p in objects.rglob("*.dcm")}

        # strace counts each thread's calls apart (its ``when``), so only the C-STORE is
        # traced: the association's accepted and released audit rows, committed on the
        # association's thread, are made outside the trace
        assoc = scu().associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established, node.log()
        try:
            strace = Strace(node.pid, tmp_path / "strace.log", syscall, when)
            try:
                rsp = assoc.send_c_store(files[1])
            finally:
                lines = strace.detach()
        finally:
            assoc.release()
        assert "Status" in rsp, f"no C-STORE-RSP\n{node.log()}"
        status = int(rsp.Status)
        synced = fsyncs(lines)
        failed = [(p, r) for p, r in synced if "EIO" in r and "INJECTED" in r]
        if target == "index commit":
            # strace counts each thread's calls apart: the refusal's audit row, the first
            # commit of the association's thread in the trace, may get an EIO of its own
            assert 1 <= len(failed) <= 2, f"one or two injected EIO expected: {synced}"
            assert all(p.endswith("-wal") for p, _ in failed), synced
            assert synced.index(failed[0]) == 2, f"the first EIO is the instance's: {synced}"
        else:
            assert len(failed) == 1, f"one injected EIO expected: {synced}"
        failed_path = failed[0][0]
        where = {
            "received file": "/spool/incoming/",
            "spool folder": "/spool/objects/",
            "index commit": "-wal",
        }[target]
        assert where in failed_path, f"the EIO hit {failed_path}, expected the {target}"

        # the instance is refused, never acknowledged
        assert status == 0xA700, f"0x{status:04X}\n{node.log()}"
        failed_at = time.monotonic()
        if target != "index commit":  # unhealthy: refused until a probe, one per interval
            assert c_store(node, files[2]) == 0xA700
            canary(node)  # the node keeps serving
        # fsyncgate: a spool file whose fsync failed is never fsync'd again (SQLite's WAL is
        # SQLite's: it rolls the transaction back and its next commit rewrites those frames)
        after_failure = synced[synced.index(failed[0]) + 1 :]
        if target != "index commit":
            assert all(p != failed_path for p, _ in after_failure), after_failure
        # ... nor renamed into the spool, and nothing of the refused instance is kept
        if target == "received file":
            assert not any(
                "rename" in line and failed_path in line.split(",")[0] for line in lines
            ), "a received file whose fsync failed was renamed into the spool"
        assert {p for p in objects.rglob("*.dcm")} == before, "the refused instance was kept"
        indexed = {
            r["sop_instance_uid"]
            for r in node.cli_json("audit", "list", "--limit", "1000")
            if r["event_type"] == "c-store" and r["outcome"] == "success"
        }
        assert uids[1] not in indexed

        if target != "index commit":
            # the spool is unhealthy: audited, metric 0, every store refused until a probe
            audited.expect(
                lambda r: (
                    r["event_type"] == "spool"
                    and r["outcome"] == "failure"
                    and r["detail"].get("health") == "unhealthy"
                )
            )
            assert metric(node, "gateway_spool_healthy") == 0
            assert metric(node, "gateway_spool_faults_total") == 1
            time.sleep(max(0.0, PROBE_INTERVAL + 0.2 - (time.monotonic() - failed_at)))
        # recovered: the probe succeeds, stores go through again, the refused one too
        assert c_store(node, files[2]) == 0x0000, node.log()
        assert c_store(node, files[1]) == 0x0000, node.log()
        assert c_store(node, files[3]) == 0x0000, node.log()
        if target != "index commit":
            audited.expect(
                lambda r: (
                    r["event_type"] == "spool"
                    and r["outcome"] == "success"
                    and r["detail"].get("health") == "recovered"
                )
            )
        assert metric(node, "gateway_spool_healthy") == 1
        canary(node)
        assert node.cli("audit", "verify").returncode == 0
        stored = {p for p in objects.rglob("*.dcm")}
        assert len(stored) == 5, "one spool file per acknowledged instance, nothing more"
        node.stop()
    # after a restart nothing is lost and nothing half-indexed remains
    with node:
        rows = node.cli_json("audit", "list", "--limit", "1000")
        ok = {
            r["sop_instance_uid"]
            for r in rows
            if r["event_type"] == "c-store" and r["outcome"] == "success"
        }
        assert ok == set(uids)
        assert {p for p in objects.rglob("*.dcm")} == stored
