"""How the worker treats what destinations answer (FAULTS F9-F11): scripted pynetdicom SCPs
on loopback return chosen C-STORE statuses, or hang."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt

from tests.e2e.test_forward import storescu
from tests.support.datasets import make_ct_study, sop_instance_uids
from tests.support.node import GatewayNode
from tests.support.peers import free_port


class ScriptedSCP:
    """A C-STORE SCP answering ``status`` (or sleeping ``hang`` seconds first)."""

    def __init__(self, status: int, *, hang: float = 0.0, aet: str = "SCRIPTED") -> None:
        self.status = status
        self.hang = hang
        self.aet = aet
        self.port = free_port()
        self.received: list[str] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=aet)
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store)],
        )

    def _store(self, event: Any) -> int:
        if self.hang:
            time.sleep(self.hang)
        with self._lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.status

    def destination(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "ae_title": self.aet,
            "host": "127.0.0.1",
            "port": self.port,
            "dimse_timeout": 2,
            "network_timeout": 5,
            "connect_timeout": 3,
        }

    def close(self) -> None:
        self._server.shutdown()


@pytest.fixture
def scp_factory() -> Iterator[Any]:
    made: list[ScriptedSCP] = []

    def make(status: int, **kw: Any) -> ScriptedSCP:
        scp = ScriptedSCP(status, **kw)
        made.append(scp)
        return scp

    yield make
    for scp in made:
        scp.close()


def _node(tmp_path: Path, destinations: list[dict[str, Any]], **kw: Any) -> GatewayNode:
    return GatewayNode(
        tmp_path / "node",
        destinations=destinations,
        routes=[
            {"name": "all", "destinations": [d["name"] for d in destinations], "quiet_seconds": 0.3}
        ],
        worker={"max_attempts": 3, "backoff_initial": 0.3, "backoff_max": 1, **kw},
    )


def test_refusal_goes_to_the_dead_letter_at_once(tmp_path: Path, scp_factory: Any) -> None:
    scp = scp_factory(0xA900)
    files = make_ct_study(tmp_path / "s", 3)
    with _node(tmp_path, [scp.destination("dest")]) as node:
        storescu(node, files)
        (failed,) = node.wait_for_deliveries("failed", 1, timeout=30)
        shown = node.cli_json("queue", "show", failed["id"])
    assert failed["attempts"] == 1
    assert failed["failed"] == 3
    assert {i["status"] for i in shown["items"]} == {0xA900}
    assert "0xA900" in shown["items"][0]["reason"]


def test_out_of_resources_retries_then_dead_letters(tmp_path: Path, scp_factory: Any) -> None:
    scp = scp_factory(0xA700)
    files = make_ct_study(tmp_path / "s", 2)
    with _node(tmp_path, [scp.destination("dest")]) as node:
        storescu(node, files)
        (failed,) = node.wait_for_deliveries("failed", 1, timeout=60)
        shown = node.cli_json("queue", "show", failed["id"])
        retried = node.cli_json("queue", "retry", failed["id"])
    assert failed["attempts"] == 3
    assert [a["outcome"] for a in shown["attempt_log"]] == [
        "retryable_failure",
        "retryable_failure",
        "attempts_exhausted",
    ]
    assert "0xA700" in failed["last_error"]
    assert retried["state"] == "pending"


def test_warning_counts_as_delivered_and_is_recorded(tmp_path: Path, scp_factory: Any) -> None:
    scp = scp_factory(0xB000)
    files = make_ct_study(tmp_path / "s", 3)
    with _node(tmp_path, [scp.destination("dest")]) as node:
        storescu(node, files)
        (done,) = node.wait_for_deliveries("delivered_with_warnings", 1, timeout=30)
    assert done["warnings"] == 3 and done["sent"] == 3
    assert sorted(scp.received) == sop_instance_uids(files)


def test_silent_destination_times_out_without_starving_others(
    tmp_path: Path, scp_factory: Any
) -> None:
    hung = scp_factory(0x0000, hang=30, aet="HUNG")
    good = scp_factory(0x0000, aet="GOOD")
    files = make_ct_study(tmp_path / "s", 4)
    node = _node(tmp_path, [hung.destination("hung"), good.destination("good")])
    with node:
        started = time.monotonic()
        storescu(node, files)
        node.wait_for_deliveries("delivered", 1, timeout=30)
        took = time.monotonic() - started
        rows = {d["destination"]: d for d in node.deliveries()}
    assert sorted(good.received) == sop_instance_uids(files)
    assert took < 20  # the hung destination did not hold the good one back
    assert rows["hung"]["state"] in ("retry_wait", "in_progress", "failed")


def test_logs_and_metrics_carry_no_patient_data(tmp_path: Path, scp_factory: Any) -> None:
    scp = scp_factory(0x0000)
    files = make_ct_study(tmp_path / "s", 3, patient_id="PID-SECRET-42", patient_name="Doe^Janet")
    with _node(tmp_path, [scp.destination("dest")]) as node:
        storescu(node, files)
        node.wait_for_deliveries("delivered", 1, timeout=30)
        metrics = node.metrics()
        log = node.log_path.read_text()
    uids = sop_instance_uids(files)
    for text in (metrics, log):
        assert "PID-SECRET-42" not in text
        assert "Doe" not in text
        for uid in uids:
            assert uid not in text
    assert 'gateway_instances_received_total{called_ae="GATEWAY",outcome="stored"} 3.0' in metrics
    assert 'gateway_instances_forwarded_total{destination="dest",outcome="sent"} 3.0' in metrics


def test_values_pydicom_finds_invalid_stay_out_of_the_logs(
    tmp_path: Path, scp_factory: Any
) -> None:
    """pydicom quotes a value it finds invalid in its warning ("Invalid value for VR DA:
    '1947-03-15'"); received, indexed, de-identified and forwarded, such values never reach
    the node's log."""
    scp = scp_factory(0x0000)
    planted = {
        "PatientBirthDate": "1947-03-15",  # DA written with dashes
        "PatientSex": "janet",  # CS in lower case
        "FrameOfReferenceUID": "1.2.0377.4",  # a UID component with a leading zero
        "OperatorsName": "Doe^Janet^^^^^extra",  # PN with too many components
    }
    files = make_ct_study(tmp_path / "s", 2, **planted)
    node = GatewayNode(
        tmp_path / "node",
        destinations=[scp.destination("dest")],
        routes=[
            {"name": "all", "destinations": ["dest"], "profile": "basic", "quiet_seconds": 0.3}
        ],
        worker={"max_attempts": 3, "backoff_initial": 0.3, "backoff_max": 1},
    )
    with node:
        storescu(node, files)
        node.wait_for_deliveries("delivered", 1, timeout=30)
        log = node.log_path.read_text()
    assert len(scp.received) == 2
    for value in (*planted.values(), "Janet", "0377"):
        assert value not in log
