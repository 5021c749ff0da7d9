"""A P-DATA is written by the thread that sends it (WakingDUL.send_pdata) when that keeps
pynetdicom's order, and by the DUL thread otherwise: while the DUL thread acts (its order
lock held) and on a TLS connection, whose SSL object must not be written while the DUL
thread may be reading it.

The sender is the node's StoreSCU (the delivery path: gateway.dicom.commands'
send_file_store); the peer is DCMTK storescp, plain and with TLS. Every write to the
association's socket is recorded with the thread that made it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import _config
from pynetdicom import ae as pynetdicom_ae
from pynetdicom.dul import DULServiceProvider

from gateway.config.model import DestinationConfig, DestinationTLSConfig
from gateway.crypto.tls import ca_init, ca_issue
from gateway.dicom.reactor import BoundedRequestor, WaitingSocket, WakingDUL
from gateway.dicom.scu import OutgoingFile, StoreSCU
from tests.support.datasets import outgoing_ct_files
from tests.support.peers import StoreSCP

P_DATA_TF = 0x04
A_ASSOCIATE_RQ = 0x01


@dataclass
class Write:
    by_dul: bool  # written by the association's DUL thread
    pdu_type: int


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[Write]:
    """The node's outgoing associations as configure_pynetdicom makes them (data sets sent
    from their files), each write to their sockets recorded."""
    monkeypatch.setattr(pynetdicom_ae, "Association", BoundedRequestor)
    monkeypatch.setattr(pynetdicom_ae, "AssociationSocket", WaitingSocket)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")  # no EVT_DIMSE_SENT handler
    recorded: list[Write] = []
    original = WaitingSocket.send

    def recording(self: WaitingSocket, bytestream: bytes) -> None:
        by_dul = isinstance(threading.current_thread(), DULServiceProvider)
        recorded.append(Write(by_dul, bytestream[0]))
        original(self, bytestream)

    monkeypatch.setattr(WaitingSocket, "send", recording)
    return recorded


@pytest.fixture
def duls(monkeypatch: pytest.MonkeyPatch) -> list[WakingDUL]:
    made: list[WakingDUL] = []
    original = WakingDUL.__init__

    def init(self: WakingDUL, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(WakingDUL, "__init__", init)
    return made


def _files(tmp_path: Path, n: int) -> list[OutgoingFile]:
    return outgoing_ct_files(tmp_path / "study", n, 29, rows=256, cols=256)


def _received(folder: Path) -> dict[str, bytes]:
    """SOP Instance UID -> Pixel Data of what storescp wrote."""
    out = {}
    for path in folder.glob("*"):
        ds = pydicom.dcmread(path)
        out[str(ds.SOPInstanceUID)] = ds.PixelData
    return out


def _originals(files: list[OutgoingFile]) -> dict[str, bytes]:
    return {f.sop_instance_uid: pydicom.dcmread(f.path).PixelData for f in files}


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StoreSCP]:
    with StoreSCP(tmp_path / "received") as peer:
        yield peer


def test_pdata_written_by_the_sending_thread(
    tmp_path: Path, scp: StoreSCP, writes: list[Write]
) -> None:
    files = _files(tmp_path, 3)
    scu = StoreSCU(
        DestinationConfig(name="d", ae_title=scp.aet, port=scp.port, max_pdu_size=16384),
        calling_ae_title="GATEWAY",
    )
    with scu.associate(files) as send:
        assert [send(f) for f in files] == [0x0000] * 3
    pdata = [w for w in writes if w.pdu_type == P_DATA_TF]
    # each 128 KB data set in fragments of the peer's maximum PDU, and a command each
    assert len(pdata) > 3 * 8, len(pdata)
    assert not any(w.by_dul for w in pdata), "a P-DATA went through the DUL thread's queue"
    # the association's own PDUs still go the DUL's way (the state machine sends them)
    assert [w.by_dul for w in writes if w.pdu_type == A_ASSOCIATE_RQ] == [True]
    assert _received(tmp_path / "received") == _originals(files)


def test_pdata_queued_while_the_dul_thread_acts(
    tmp_path: Path, scp: StoreSCP, writes: list[Write], duls: list[WakingDUL]
) -> None:
    """While the DUL thread holds its order lock (here another thread holds it, as the DUL
    thread does while its state machine acts), a P-DATA is queued: the DUL thread sends it,
    once the lock is free, in the order it was queued."""
    files = _files(tmp_path, 2)
    scu = StoreSCU(
        DestinationConfig(name="d", ae_title=scp.aet, port=scp.port), calling_ae_title="GATEWAY"
    )
    with scu.associate(files) as send:
        assert send(files[0]) == 0x0000
        (dul,) = duls
        first = len(writes)
        held = threading.Event()
        release = threading.Event()

        def hold() -> None:
            with dul.order:
                held.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert held.wait(10)
            threading.Timer(0.3, release.set).start()
            assert send(files[1]) == 0x0000  # waits for the lock's release, then is sent
        finally:
            release.set()
            holder.join(10)
        queued = [w for w in writes[first:] if w.pdu_type == P_DATA_TF]
        assert queued and all(w.by_dul for w in queued), queued
    assert _received(tmp_path / "received") == _originals(files)


def test_tls_pdata_written_by_the_dul_thread(tmp_path: Path, writes: list[Write]) -> None:
    ca_init(tmp_path / "ca")
    server = ca_issue(tmp_path / "ca", "storescp", tmp_path / "storescp-cert")
    node = ca_issue(tmp_path / "ca", "gateway-node", tmp_path / "node-cert")
    ca = tmp_path / "ca" / "ca.crt"
    scp_tls = ["+tls", str(server.key_file), str(server.cert_file), "+cf", str(ca)]
    files = _files(tmp_path, 2)
    with StoreSCP(tmp_path / "received", tls=scp_tls) as scp:
        scu = StoreSCU(
            DestinationConfig(
                name="d",
                ae_title=scp.aet,
                port=scp.port,
                tls=DestinationTLSConfig(
                    ca_file=ca,
                    cert_file=node.cert_file,
                    key_file=node.key_file,
                    server_name="storescp",
                ),
            ),
            calling_ae_title="GATEWAY",
        )
        with scu.associate(files) as send:
            assert [send(f) for f in files] == [0x0000] * 2
    pdata = [w for w in writes if w.pdu_type == P_DATA_TF]
    assert pdata and all(w.by_dul for w in pdata), "a TLS socket written beside its reader"
    assert _received(tmp_path / "received") == _originals(files)
