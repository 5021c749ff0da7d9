"""FAULTS F18: no memory for one PDU in the middle of a C-STORE's data set, or for an
association's thread.

The node runs with a ``sitecustomize`` (on its ``PYTHONPATH``, test-only) that makes one
allocation fail as the address space being full would: the buffer for the third large
P-DATA-TF's body (``read``), or that PDU's decoding, for as long as the node waits for
memory (``decode``; the wait is shortened to 0.2 s). Everything else is the real node on a
real association.

Expected: that C-STORE is drained, its remaining PDUs read without being held, and answered
0xA700 (out of resources); the association goes on, and the next C-STORE on it is stored.
Before, the association was aborted and the first C-STORE got no response.

``select``: the association's DUL has no memory to look at its socket (``select()``
raises ``MemoryError``) twenty times in a row. Expected: it looks again and the
association goes on. Before, pynetdicom's loop aborted it (seen under ``prlimit --as``).

``thread``: starting an association's thread raises ``SystemError`` ("error return
without exception set"), which CPython raised under ``prlimit --as`` where an allocation
failed without setting ``MemoryError``. Expected: that association is rejected as transient
(2/3/2), the next one is accepted. Before, the connection closed unanswered.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from pynetdicom import AE

from tests.support.datasets import make_instance
from tests.support.node import GatewayNode
from tests.support.pdus import rejection

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"

INJECT = """
import os

MODE = os.environ.get("GATEWAY_TEST_NO_MEMORY")
if MODE:
    from gateway.dicom import guard, reactor

    state = {"large": 0, "fail_decode": False}
    read_exact = guard.GuardedSocket._read_exact
    decode_pdu = reactor.WakingDUL._decode_pdu
    pdata_over = reactor._pdata_over  # a P-DATA-TF's decoding (over its buffer)
    with_memory = reactor.with_memory

    def _read_exact(self, nr_bytes):
        if nr_bytes > 100_000:  # a P-DATA-TF body
            state["large"] += 1
            if state["large"] == 3:
                if MODE == "read":
                    raise MemoryError  # as with_memory gives up
                state["fail_decode"] = True
        return read_exact(self, nr_bytes)

    def _decode_pdu(self, bytestream):
        if state["fail_decode"]:
            raise MemoryError
        return decode_pdu(self, bytestream)

    def _pdata_over(body):
        if state["fail_decode"]:
            raise MemoryError
        return pdata_over(body)

    def _with_memory(make, *, until=None):
        try:
            return with_memory(make, until=until)
        except MemoryError:
            state["fail_decode"] = False  # given up once: memory comes back
            raise

    guard.GuardedSocket._read_exact = _read_exact
    reactor.WakingDUL._decode_pdu = _decode_pdu
    reactor._pdata_over = _pdata_over
    reactor.with_memory = _with_memory
    reactor.MEMORY_WAIT = 0.2

    if MODE == "thread":  # the next association's thread start fails as seen under F18
        from gateway.dicom import server

        start = server._GatewayAssociation.start
        flag = os.environ["GATEWAY_TEST_FAIL_NEXT_THREAD"]  # the test makes it when ready

        def _start(self):
            try:
                os.unlink(flag)
            except FileNotFoundError:
                return start(self)
            raise SystemError("error return without exception set")

        server._GatewayAssociation.start = _start

    if MODE == "select":  # no memory for select()'s lists, 20 looks in a row
        flag = os.environ["GATEWAY_TEST_FAIL_SELECT"]  # the test makes it when ready
        wait = reactor.WakingDUL._wait

        def _wait(self, sock, timeout):
            if os.path.exists(flag):
                state["selects"] = state.get("selects", 0) + 1
                if state["selects"] == 20:
                    os.unlink(flag)
                raise MemoryError
            return wait(self, sock, timeout)

        reactor.WakingDUL._wait = _wait
"""


def injected_node(tmp_path: Path, mode: str, **env: str) -> GatewayNode:
    """A node (worker off) whose ``sitecustomize`` injects ``mode``'s fault (``INJECT``)."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECT)
    return GatewayNode(
        tmp_path / "node",
        worker={"enabled": False},
        env={
            "PYTHONPATH": os.pathsep.join([str(inject), *sys.path]),
            "GATEWAY_TEST_NO_MEMORY": mode,
            **env,
        },
    )


@pytest.mark.parametrize("mode", ["read", "decode"])
def test_a_store_without_memory_midway_is_answered_and_the_association_goes_on(
    tmp_path: Path, mode: str
) -> None:
    first = make_instance(tmp_path / "first.dcm", rows=1024, cols=768, seed=1)  # ~1.5 MB
    second = make_instance(tmp_path / "second.dcm", rows=1024, cols=768, seed=2)
    node = injected_node(tmp_path, mode)
    with node:
        ae = AE(ae_title="MODALITY")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(CT, [EXPLICIT_LE])
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established
        try:
            statuses = []
            for path in (first, second):
                status = assoc.send_c_store(path)
                statuses.append(int(status.Status) if "Status" in status else "no response")
        finally:
            if assoc.is_established:
                assoc.release()
        assert statuses == [0xA700, 0x0000], node.log(100)
        assert "no memory to receive a C-STORE data set; answered 0xA700" in node.log(100)
        audited = node.cli_json("audit", "list", "--type", "c-store", "--limit", "10")
        assert sorted(r["outcome"] for r in audited) == ["failure", "success"]
        incoming = node.state_dir / "spool" / "incoming"
        assert incoming.is_dir() and not list(incoming.iterdir()), "a receive file was left"


def _verification_ae() -> AE:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae


def test_an_association_without_a_thread_is_rejected_as_transient(tmp_path: Path) -> None:
    flag = tmp_path / "fail-next-thread"
    node = injected_node(tmp_path, "thread", GATEWAY_TEST_FAIL_NEXT_THREAD=str(flag))
    with node:
        ae = _verification_ae()
        # one association served first: the start-up's port probe has had its thread by then
        first = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert first.is_established
        first.release()
        flag.touch()
        refused = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert not refused.is_established
        assert rejection(refused) == (2, 3, 2), node.log(50)
        assert "rejected (transient)" in node.log(50)
        accepted = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert accepted.is_established
        assert int(accepted.send_c_echo().Status) == 0x0000
        accepted.release()


def test_no_memory_to_look_at_the_socket_is_waited_out(tmp_path: Path) -> None:
    flag = tmp_path / "fail-select"
    node = injected_node(tmp_path, "select", GATEWAY_TEST_FAIL_SELECT=str(flag))
    with node:
        ae = _verification_ae()
        flag.touch()
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established, node.log(50)
        assert int(assoc.send_c_echo().Status) == 0x0000
        assoc.release()
        assert not flag.exists(), "the fault was not met"
        assert "Exception in DUL.run()" not in node.log(50)
