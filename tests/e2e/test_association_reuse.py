"""Associations kept open between deliveries (gateway.dicom.scu, keep_open_seconds).

In process: DicomDestination against a pynetdicom Storage SCP on loopback that records
every association it accepts and every release and abort.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from gateway.config.model import DestinationConfig
from gateway.dicom.scu import OutgoingFile
from gateway.metrics import Metrics
from gateway.transfer.destinations import DicomDestination, SendResult
from tests.support.datasets import outgoing_ct_files
from tests.support.peers import free_port


class _SCP:
    def __init__(self) -> None:
        self.port = free_port()
        self.accepted = 0
        self.open = 0
        self.most_open = 0
        self.released = 0
        self.stored: list[str] = []
        self.assocs: list[Any] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="DEST")
        for cls in (CTImageStorage, MRImageStorage):
            ae.add_supported_context(cls, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        handlers = [
            (evt.EVT_ACCEPTED, self._accepted),
            (evt.EVT_RELEASED, self._ended),
            (evt.EVT_ABORTED, self._ended),
            (evt.EVT_CONN_CLOSE, self._closed),
            (evt.EVT_C_STORE, self._store),
        ]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def _accepted(self, event: Any) -> None:
        with self._lock:
            self.accepted += 1
            self.open += 1
            self.most_open = max(self.most_open, self.open)
            self.assocs.append(event.assoc)

    def _ended(self, event: Any) -> None:
        with self._lock:
            self.released += 1

    def _closed(self, event: Any) -> None:
        with self._lock:
            if event.assoc in self.assocs:
                self.assocs.remove(event.assoc)
                self.open -= 1

    def _store(self, event: Any) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scp() -> Iterator[_SCP]:
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # as the node sends: from the file, unparsed
    server = _SCP()
    try:
        yield server
    finally:
        server.stop()
        _config.STORE_SEND_CHUNKED_DATASET = chunked


def _destination(scp: _SCP, metrics: Metrics, **kw: Any) -> DicomDestination:
    cfg = DestinationConfig(name="d", ae_title="DEST", port=scp.port, connect_timeout=5, **kw)
    return DicomDestination(cfg, calling_ae_title="GW", metrics=metrics)


def _deliver(dest: DicomDestination, files: list[OutgoingFile]) -> list[SendResult]:
    results: list[SendResult] = []
    dest.deliver(files, results.append, lambda: False)
    assert [r.outcome for r in results] == ["sent"] * len(files), results
    return results


def _count(metrics: Metrics, kind: str) -> float:
    value = metrics.registry.get_sample_value(
        "gateway_destination_associations_total", {"destination": "d", "kind": kind}
    )
    return value or 0.0


def _wait(what: str, check: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_one_association_carries_consecutive_deliveries(tmp_path: Path, scp: _SCP) -> None:
    metrics = Metrics()
    dest = _destination(scp, metrics, keep_open_seconds=1.0)
    try:
        for k in range(4):
            _deliver(dest, outgoing_ct_files(tmp_path / f"s{k}", 3, seed=k))
        assert scp.accepted == 1
        assert (_count(metrics, "opened"), _count(metrics, "reused")) == (1, 3)
        assert len(scp.stored) == 12
        # idle past keep_open_seconds: released, not left to time out
        _wait("the idle association released", lambda: scp.released == 1, timeout=5)
        assert dest.scu.idle_count == 0
        _deliver(dest, outgoing_ct_files(tmp_path / "late", 2, seed=9))
        assert scp.accepted == 2
    finally:
        dest.close()
    _wait("released on close", lambda: scp.released == 2)


def test_keep_open_zero_releases_after_each_delivery(tmp_path: Path, scp: _SCP) -> None:
    metrics = Metrics()
    dest = _destination(scp, metrics, keep_open_seconds=0)
    for k in range(3):
        _deliver(dest, outgoing_ct_files(tmp_path / f"s{k}", 2, seed=k))
    assert scp.accepted == 3
    assert _count(metrics, "reused") == 0
    _wait("every association released", lambda: scp.released == 3)
    dest.close()


def test_an_association_dropped_while_idle_is_replaced(tmp_path: Path, scp: _SCP) -> None:
    metrics = Metrics()
    dest = _destination(scp, metrics, keep_open_seconds=30)
    try:
        _deliver(dest, outgoing_ct_files(tmp_path / "a", 2, seed=1))
        assert dest.scu.idle_count == 1
        scp.assocs[0].abort()  # the destination drops the idle association
        _wait("the abort seen", lambda: not dest.scu._idle[0].alive())
        _deliver(dest, outgoing_ct_files(tmp_path / "b", 2, seed=2))
        assert scp.accepted == 2 and len(scp.stored) == 4
        assert (_count(metrics, "opened"), _count(metrics, "reused")) == (2, 0)
    finally:
        dest.close()


def test_a_stale_association_that_fails_first_is_replaced(tmp_path: Path, scp: _SCP) -> None:
    """The race the liveness check cannot see: the association looks established, then
    is lost on the first C-STORE; the instances go on a new association, no error."""
    metrics = Metrics()
    dest = _destination(scp, metrics, keep_open_seconds=30)
    try:
        _deliver(dest, outgoing_ct_files(tmp_path / "a", 2, seed=1))
        link = dest.scu._idle[0]
        real = link.assoc.send_c_store

        def lost(*args: Any, **kwargs: Any) -> Any:
            link.assoc.abort()
            return None

        link.assoc.send_c_store = lost
        files = outgoing_ct_files(tmp_path / "b", 3, seed=2)
        _deliver(dest, files)
        link.assoc.send_c_store = real
        assert scp.accepted == 2
        assert sorted(scp.stored[2:]) == sorted(f.sop_instance_uid for f in files)
        assert (_count(metrics, "opened"), _count(metrics, "reused")) == (2, 1)
    finally:
        dest.close()


def test_idle_and_busy_associations_stay_within_max_associations(tmp_path: Path, scp: _SCP) -> None:
    """An idle association negotiated for other SOP classes is released before a new one
    would pass the cap."""
    metrics = Metrics()
    dest = _destination(scp, metrics, keep_open_seconds=30, max_associations=1)
    try:
        _deliver(dest, outgoing_ct_files(tmp_path / "ct", 2, seed=1))
        mr = outgoing_ct_files(
            tmp_path / "mr", 2, seed=2, sop_class_uid=MRImageStorage, modality="MR"
        )
        _deliver(dest, mr)
        assert scp.accepted == 2
        _wait("the first association gone", lambda: scp.open == 1)
        assert scp.most_open == 1
    finally:
        dest.close()


def test_concurrent_deliveries_each_get_an_association(tmp_path: Path, scp: _SCP) -> None:
    metrics = Metrics()
    dest = _destination(scp, metrics, keep_open_seconds=30, max_associations=2)
    batches = [outgoing_ct_files(tmp_path / f"s{k}", 4, seed=k) for k in range(6)]
    errors: list[BaseException] = []

    def run(mine: list[list[OutgoingFile]]) -> None:
        try:
            for files in mine:
                _deliver(dest, files)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(batches[k::2],)) for k in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(scp.stored) == 24
        assert scp.accepted <= 2 and scp.most_open <= 2
        assert _count(metrics, "reused") >= 4
    finally:
        dest.close()
