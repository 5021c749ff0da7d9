"""``worker.separate_process``: deliveries in ``dicom-gateway worker`` beside ``serve``.

Real programs: storescu -> node (serve + worker process) -> Orthanc. Checked: a streamed
study arrives whole; the worker's counters appear on serve's metrics endpoint; a SIGKILL of
serve alone takes the worker with it (nothing left running), and after a restart the
deliveries left unfinished are completed, each instance at Orthanc once; a worker killed
while serve runs is audited and replaced; the index's audit chain verifies.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

from tests.e2e.test_forward import orthanc_destination, storescu
from tests.support.datasets import make_ct_study, sop_instance_uids
from tests.support.node import GatewayNode, child_pid, process_gone
from tests.support.peers import Orthanc


def _worker_pid(node: GatewayNode) -> int:
    return child_pid(node, "worker")


def _node(root: Path, orthanc: Orthanc) -> GatewayNode:
    return GatewayNode(
        root,
        destinations=[orthanc_destination(orthanc)],
        routes=[{"name": "all", "destinations": ["pacs"], "mode": "stream"}],
        # leases of ten minutes: a killed run's deliveries are taken again at once, without
        # waiting for them (gateway.statelock)
        worker={"separate_process": True, "poll_interval": 5, "lease_seconds": 600},
    )


def _forwarded(metrics: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if re.match(r'gateway_instances_forwarded_total\{.*outcome="sent"', line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_stream_through_worker_process_and_serve_killed(tmp_path: Path, orthanc: Orthanc) -> None:
    files = make_ct_study(tmp_path / "study", 40, seed=11)
    node = _node(tmp_path / "node", orthanc)
    with node:
        worker = _worker_pid(node)
        # poll_interval 5 s: arriving within it shows the wake-up pipe at work
        started = time.monotonic()
        storescu(node, files[:20])
        assert orthanc.wait_for_instances(20, timeout=30) == 20
        assert time.monotonic() - started < 5 + 4, "the worker waited for its poll"
        deadline = time.monotonic() + 10
        while _forwarded(node.metrics()) < 20 and time.monotonic() < deadline:
            time.sleep(0.3)  # the worker's metrics file is rewritten every second
        assert _forwarded(node.metrics()) == 20, node.metrics()

        storescu(node, files[20:])
        os.kill(node.pid, signal.SIGKILL)  # serve alone, not its process group
        assert process_gone(worker, 5), "the worker outlived serve"
        node.proc.wait(10)  # type: ignore[union-attr]
        node.proc = None
    with node:  # restart: what was acknowledged and not yet sent goes out now
        assert orthanc.wait_for_instances(40, timeout=60) == 40
        node.wait_for_deliveries("delivered", 1, timeout=60)
    assert sorted(orthanc.sop_instance_uids()) == sorted(sop_instance_uids(files))
    assert node.cli("audit", "verify").returncode == 0


def test_worker_killed_is_replaced(tmp_path: Path, orthanc: Orthanc) -> None:
    """Killed idle and killed while forwarding: replaced each time, and what the dead one
    had claimed is taken by its successor at once, not when its lease would run out."""
    files = make_ct_study(tmp_path / "study", 60, seed=12)
    node = _node(tmp_path / "node", orthanc)
    with node:
        first = _worker_pid(node)
        os.kill(first, signal.SIGKILL)
        second = child_pid(node, "worker", exclude=[first])
        assert second != first, node.log()
        storescu(node, files[:10])
        assert orthanc.wait_for_instances(10, timeout=30) == 10
        sender = threading.Thread(target=storescu, args=(node, files[10:]))
        sender.start()
        try:
            assert orthanc.wait_for_instances(15, timeout=30) >= 15
            os.kill(second, signal.SIGKILL)  # mid-stream
        finally:
            sender.join(60)
        child_pid(node, "worker", exclude=[first, second])
        assert orthanc.wait_for_instances(60, timeout=60) == 60, node.log()
        rows = node.cli_json("audit", "list", "--type", "application")
    assert [r["outcome"] for r in rows].count("worker-exited") == 2, rows
    assert sorted(orthanc.sop_instance_uids()) == sorted(sop_instance_uids(files))
