"""FAULTS F18 on the node's outgoing side: an association it opens (a delivery, a C-MOVE or
C-GET sub-operation, an upstream query) whose DUL or association thread dies as it starts,
as under a full address space, is a retry within seconds, never a thread that waits forever.

The death is made the way F18 makes it: the new thread raises MemoryError in its bootstrap,
before it tells ``Thread.start()`` it runs. The peer is DCMTK storescp; after the fault the
same StoreSCU sends again.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import ae as pynetdicom_ae
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

from gateway.config.model import DestinationConfig
from gateway.dicom import reactor
from gateway.dicom.reactor import BoundedRequestor
from gateway.dicom.scu import OUT_OF_THREADS, OutgoingFile, StoreSCU
from gateway.errors import RetryableError
from tests.support.datasets import make_ct_study
from tests.support.peers import StoreSCP

START_WAIT = 1.0


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StoreSCP]:
    with StoreSCP(tmp_path / "storescp", extra_args=["-v"]) as peer:
        yield peer


@pytest.fixture
def bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """What configure_pynetdicom installs, for this test only; a short START_WAIT."""
    monkeypatch.setattr(pynetdicom_ae, "Association", BoundedRequestor)
    monkeypatch.setattr(reactor, "START_WAIT", START_WAIT)


def _dies_starting(monkeypatch: pytest.MonkeyPatch, kind: type[threading.Thread]) -> None:
    original = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def bootstrap(self: threading.Thread) -> None:
        if isinstance(self, kind):
            raise MemoryError  # before the new thread sets its "started" event
        original(self)

    monkeypatch.setattr(threading.Thread, "_bootstrap_inner", bootstrap)


def _file(tmp_path: Path) -> OutgoingFile:
    (path,) = make_ct_study(tmp_path / "study", 1, seed=71)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return OutgoingFile(
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID), path
    )


def _send(scu: StoreSCU, f: OutgoingFile) -> int:
    with scu.associate([f]) as send:
        return send(f)


def _timed_retry(scu: StoreSCU, f: OutgoingFile) -> float:
    """Seconds until the attempt raised RetryableError(OUT_OF_THREADS); fails on a hang."""
    outcome: list[BaseException | int] = []

    def attempt() -> None:
        try:
            outcome.append(_send(scu, f))
        except BaseException as exc:  # inspected below
            outcome.append(exc)

    started = time.monotonic()
    worker = threading.Thread(target=attempt, daemon=True)  # not of the dying kind
    worker.start()
    worker.join(START_WAIT * 10)
    assert not worker.is_alive(), "the outgoing association hung on its thread's start"
    (result,) = outcome
    assert isinstance(result, RetryableError), result
    assert str(result) == OUT_OF_THREADS
    return time.monotonic() - started


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the fault
@pytest.mark.parametrize(
    "kind", [DULServiceProvider, Association], ids=["dul-thread", "association-thread"]
)
def test_outgoing_thread_that_dies_starting_is_a_retry(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    bounded: None,
    scp: StoreSCP,
    kind: type[threading.Thread],
) -> None:
    f = _file(tmp_path)
    scu = StoreSCU(
        DestinationConfig(name="d", ae_title=scp.aet, port=scp.port, connect_timeout=5),
        calling_ae_title="GATEWAY",
    )
    with monkeypatch.context() as fault:
        _dies_starting(fault, kind)
        took = _timed_retry(scu, f)
    assert took < START_WAIT + 3, took
    if kind is Association:
        # negotiated, then its thread did not start: aborted, not left to the peer's timeout
        deadline = time.monotonic() + 5
        while "Abort" not in scp.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "Abort" in scp.log_path.read_text(), scp.log_path.read_text()
    assert _send(scu, f) == 0x0000  # threads start again: the same destination is served
    assert list((tmp_path / "storescp").glob("*"))


def test_configure_pynetdicom_installs_the_bounded_requestor(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; import pynetdicom.ae as a;"
        "from gateway.dicom.reactor import BoundedRequestor;"
        "from gateway.dicom.server import configure_pynetdicom;"
        "configure_pynetdicom(Path(sys.argv[1]));"
        "assert a.Association is BoundedRequestor, a.Association;"
        # the AE still counts acceptor associations (its limits) under the replaced name
        "from pynetdicom import AE; from pynetdicom.association import Association;"
        "import threading; ae = AE(); acc = Association(ae, 'acceptor');"
        "assert isinstance(acc, a.Association)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "incoming")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
