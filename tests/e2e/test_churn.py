"""A21: association churn leaves the node flat.

10,000 connect / A-ASSOCIATE / A-RELEASE / close cycles over plain TCP, and over DICOM TLS,
against one ``dicom-gateway serve`` process: after a warm-up of 500 cycles, the node's
resident memory (VmRSS), open file descriptors (/proc/PID/fd) and threads must end within 5%
of what they were (DCMTK CVE-2026-50254/35505 leaked on repeated connection requests, DCMTK
3261f13d leaked pool threads).

The client sends pre-built PDU bytes from several threads (``tests/support/churn.py``); the
node is the bottleneck (one core, Python). CI runs 10,000 plain cycles and
``GATEWAY_CHURN_TLS_CYCLES`` (default 1,500) TLS cycles; the full TLS soak is::

    GATEWAY_CHURN_TLS_CYCLES=10000 scripts/test tests/e2e/test_churn.py -s
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Iterator

import pytest

from gateway.crypto.tls import IssuedCertificate, ca_init, ca_issue
from tests.support.churn import churn
from tests.support.node import GatewayNode
from tests.support.pdus import open_fds, proc_status

WARM_UP = 500
PLAIN_CYCLES = int(os.environ.get("GATEWAY_CHURN_PLAIN_CYCLES", "10000"))
TLS_CYCLES = int(os.environ.get("GATEWAY_CHURN_TLS_CYCLES", "1500"))
TOLERANCE = 0.05


def snapshot(pid: int) -> dict[str, int]:
    status = proc_status(pid)
    return {
        "rss_kib": status["VmRSS"],
        "hwm_kib": status["VmHWM"],
        "threads": status["Threads"],
        "fds": open_fds(pid),
    }


def settled(pid: int, baseline: dict[str, int], timeout: float = 15.0) -> dict[str, int]:
    """The node's figures once the last associations' threads and sockets have ended."""
    deadline = time.monotonic() + timeout
    while True:
        now = snapshot(pid)
        if (now["threads"] <= baseline["threads"] and now["fds"] <= baseline["fds"]) or (
            time.monotonic() > deadline
        ):
            return now
        time.sleep(0.2)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[IssuedCertificate, IssuedCertificate]:
    root = tmp_path_factory.mktemp("churn-pki")
    ca_init(root / "ca")
    return ca_issue(root / "ca", "gateway-node", root / "node"), ca_issue(
        root / "ca", "churn-client", root / "client"
    )


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, pki: tuple[IssuedCertificate, IssuedCertificate]
) -> Iterator[GatewayNode]:
    server, _client = pki
    gateway = GatewayNode(
        tmp_path_factory.mktemp("churn") / "node",
        # the churn client runs 6 cycles at once from one address: room for them, so a
        # cycle's failure is a fault, never the per-address limit doing its job
        dicom={
            "max_associations_per_address": 32,
            "tls": {
                "enabled": True,
                "cert_file": str(server.cert_file),
                "key_file": str(server.key_file),
                "ca_file": str(server.ca_file),
            },
        },
        worker={"enabled": False},
    )
    with gateway:
        yield gateway


def client_context(pki: tuple[IssuedCertificate, IssuedCertificate]) -> ssl.SSLContext:
    server, client = pki
    context = ssl.create_default_context(cafile=str(server.ca_file))
    context.load_cert_chain(str(client.cert_file), str(client.key_file))
    return context


def run_churn(node: GatewayNode, port: int, cycles: int, tls: ssl.SSLContext | None) -> None:
    label = "TLS" if tls is not None else "plain"
    assert cycles > WARM_UP, cycles
    start = settled(node.pid, snapshot(node.pid), timeout=2)
    warm = churn(port, WARM_UP, tls=tls)
    assert not warm.failures, (warm.failures, node.log())
    before = settled(node.pid, start)
    run = churn(port, cycles - WARM_UP, tls=tls)
    after = settled(node.pid, before)
    print(
        f"\nchurn {label}: {cycles} cycles ({WARM_UP} warm-up), {run.per_second:.0f} cycles/s "
        f"({warm.seconds + run.seconds:.1f} s); start {start}; after warm-up {before}; "
        f"end {after}; failures {dict(run.failures)}"
    )
    assert not run.failures, (run.failures, node.log())
    for key in ("rss_kib", "fds", "threads"):
        assert after[key] <= before[key] * (1 + TOLERANCE), (label, key, before, after)
    assert node.proc is not None and node.proc.poll() is None  # still running


def test_plain_churn_is_flat(node: GatewayNode) -> None:
    run_churn(node, node.port, PLAIN_CYCLES, None)


def test_tls_churn_is_flat(
    node: GatewayNode, pki: tuple[IssuedCertificate, IssuedCertificate]
) -> None:
    assert node.tls_port is not None
    run_churn(node, node.tls_port, TLS_CYCLES, client_context(pki))
