"""Limits one sender cannot break for the others: connections per address, and the size of
one instance (``dicom.max_connections_per_address``, ``dicom.max_instance_bytes``).

A single host holding idle TCP connections used to fill the node's global
``max_connections`` and lock every modality out until the ARTIM timer freed them; an endless
C-STORE data set was written to the spool until the disk was full.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from tests.support.datasets import make_instance
from tests.support.node import GatewayNode
from tests.support.pdus import wait_closed

VERIFICATION = "1.2.840.10008.1.1"
PER_ADDRESS = 4


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayNode]:
    gateway = GatewayNode(
        tmp_path_factory.mktemp("limits") / "node",
        allow=[{"called_ae": "GATEWAY", "calling_ae": ["*"], "addresses": ["127.0.0.0/8"]}],
        dicom={
            "max_connections": 64,
            "max_connections_per_address": PER_ADDRESS,
            "max_instance_bytes": 1 << 20,
            "acse_timeout": 30,
        },
        worker={"enabled": False},
    )
    with gateway:
        yield gateway


def events(node: GatewayNode, kind: str) -> float:
    pattern = re.compile(r'gateway_security_events_total\{kind="' + kind + r'"\} (\S+)$')
    for line in node.metrics().splitlines():
        m = pattern.match(line)
        if m:
            return float(m.group(1))
    return 0.0


def echo(node: GatewayNode, source: str) -> int:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="GATEWAY", bind_address=(source, 0))
    assert assoc.is_established, node.log()
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def test_one_address_cannot_take_every_connection(node: GatewayNode) -> None:
    # connections closed just before (the start-up probe) count until the node has read
    # their close, a few polls later
    time.sleep(1.0)
    address = ("127.0.0.1", node.port)
    held = [socket.create_connection(address, timeout=5) for _ in range(PER_ADDRESS)]
    try:
        time.sleep(0.3)  # each is counted by the accept loop before the next test
        before = events(node, "connection-limit-per-address")
        extra = socket.create_connection(address, timeout=5)
        waited, data = wait_closed(extra, 3.0)
        assert data == b"" and waited < 2.0, (waited, data)  # closed at once, nothing read
        assert events(node, "connection-limit-per-address") == before + 1
        # another address is served while 127.0.0.1 holds its share (the ARTIM timer of
        # 30 s has not freed any of them)
        assert echo(node, "127.0.0.2") == 0x0000
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # the held ones are gone: 127.0.0.1 is served again
        try:
            assert echo(node, "127.0.0.1") == 0x0000
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_instance_over_the_size_cap_is_aborted_and_removed(
    node: GatewayNode, tmp_path: Path
) -> None:
    path = make_instance(tmp_path / "big.dcm", rows=1024, cols=1024, seed=1)
    assert path.stat().st_size > 2 << 20
    incoming = node.state_dir / "spool"
    before = {p for p in incoming.rglob("*") if p.is_file()}

    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="GATEWAY")
    assert assoc.is_established, node.log()
    status = assoc.send_c_store(path)
    assert "Status" not in status  # no response: the association was aborted
    deadline = time.monotonic() + 5
    while assoc.is_established:  # pynetdicom notices the abort on its next read
        assert time.monotonic() < deadline, "the association was not ended"
        time.sleep(0.05)
    rows = node.cli_json("audit", "list", "--type", "association", "--limit", "100000")
    assert any("instance-too-large" in str(r) for r in rows), rows[-3:]
    assert node.cli("audit", "verify").returncode == 0

    # nothing of it is kept: no receive buffer, no spool object, no index row
    deadline = time.monotonic() + 5
    while {p for p in incoming.rglob("*") if p.is_file()} - before:
        assert time.monotonic() < deadline, sorted(
            str(p) for p in {p for p in incoming.rglob("*") if p.is_file()} - before
        )
        time.sleep(0.1)
    assert node.cli_json("queue", "list") == []  # nothing was indexed or routed

    # the node keeps serving, and an instance under the cap is stored
    small_path = make_instance(tmp_path / "small.dcm", sop_instance_uid=generate_uid())
    assoc = ae.associate("127.0.0.1", node.port, ae_title="GATEWAY")
    assert assoc.is_established, node.log()
    try:
        assert int(assoc.send_c_store(small_path).Status) == 0x0000
    finally:
        assoc.release()
