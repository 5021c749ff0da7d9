"""FAULTS A19 (Q/R abuse) beyond tests/e2e/test_qr.py, with pynetdicom as the SCU so every
status is read exactly: C-FIND with ``*`` (or universal) on every key stops at
``qr.max_results`` with 0xA700; a C-CANCEL sent while the responses are going out ends the
C-FIND with 0xFE00 before all of them; keys made of LIKE and SQL metacharacters are literal
text at every level and for every kind of key; an invalid level is refused; C-MOVE to our own
AE title and to an unknown one is 0xA801, to a destination the caller may not use 0x0124; every
refusal is audited and the audit chain verifies.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association

from tests.support.datasets import make_ct_study
from tests.support.node import GatewayNode, render_toml
from tests.support.peers import StoreSCP, dcmtk

FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
N = 240
MAX = 100


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayNode]:
    tmp = tmp_path_factory.mktemp("qr-abuse")
    files = make_ct_study(
        tmp / "study", N, rows=16, cols=16, patient_id="PID-Q", patient_name="Quux^Quentin"
    )
    ws = StoreSCP(tmp / "ws", aet="WS").start()
    gw = GatewayNode(tmp / "node", worker={"enabled": False})
    qr = {
        "max_results": MAX,
        "move_destinations": [
            {"name": "ws", "ae_title": "WS", "port": ws.port},
            {
                "name": "private",
                "ae_title": "PRIVATE",
                "port": ws.port,
                "allowed_callers": ["SOMEONE"],
            },
        ],
    }
    gw.config_path.write_text(gw.config_path.read_text() + "\n" + render_toml({"qr": qr}))
    with gw:
        proc = dcmtk(
            "storescu",
            "-aet",
            "MODALITY",
            "-aec",
            "GATEWAY",
            "127.0.0.1",
            str(gw.port),
            *[str(f) for f in files],
        )
        assert proc.returncode == 0, proc.stderr
        yield gw
    ws.stop()


def associate(node: GatewayNode, *contexts: str) -> Association:
    ae = AE(ae_title="WS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for c in contexts or (FIND,):
        ae.add_requested_context(c)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="GATEWAY")
    assert assoc.is_established, node.log()
    return assoc


def every_key(level: str = "IMAGE") -> Dataset:
    """``*`` on every string key the node matches, universal on the rest."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in (
        "PatientName",
        "PatientID",
        "AccessionNumber",
        "StudyDescription",
        "StudyID",
        "ReferringPhysicianName",
        "Modality",
        "SeriesDescription",
        "PatientSex",
    ):
        setattr(ds, keyword, "*")
    for keyword in (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "StudyDate",
        "StudyTime",
        "PatientBirthDate",
        "SeriesNumber",
        "InstanceNumber",
        "SOPClassUID",
    ):
        setattr(ds, keyword, "")
    return ds


def c_find(node: GatewayNode, ds: Dataset) -> tuple[list[int], list[Dataset]]:
    assoc = associate(node)
    try:
        statuses, found = [], []
        for status, identifier in assoc.send_c_find(ds, FIND):
            assert "Status" in status, f"no C-FIND response\n{node.log()}"
            statuses.append(int(status.Status))
            if identifier is not None and status.Status in (0xFF00, 0xFF01):
                found.append(identifier)
        return statuses, found
    finally:
        assoc.release()


def audit(node: GatewayNode, kind: str) -> list[dict[str, Any]]:
    return list(node.cli_json("audit", "list", "--type", kind, "--limit", "1000"))


def test_every_key_wildcard_is_bounded_by_max_results(node: GatewayNode) -> None:
    statuses, found = c_find(node, every_key())
    assert statuses[:-1] == [0xFF00] * MAX, statuses[:3]
    assert statuses[-1] == 0xA700, "more matches than max_results must end with 0xA700"
    assert len({str(ds.SOPInstanceUID) for ds in found}) == MAX
    # under the bound, the whole answer and Success
    statuses, found = c_find(node, every_key("SERIES"))
    assert statuses == [0xFF00, 0x0000]
    assert str(found[0].PatientName) == "Quux^Quentin"


def _find_cancelled_after_first_response(node: GatewayNode) -> list[int]:
    ds = every_key()
    ds.PatientName = "Q*"
    assoc = associate(node)
    statuses: list[int] = []
    sending = threading.Event()

    def run() -> None:
        for status, _identifier in assoc.send_c_find(ds, FIND, msg_id=41):
            statuses.append(int(status.Status))
            sending.set()

    t = threading.Thread(target=run)
    t.start()
    assert sending.wait(30), node.log()
    assoc.send_c_cancel(41, context_id=assoc.accepted_contexts[0].context_id)
    t.join(30)
    assoc.release()
    return statuses


def test_cancel_ends_a_find_before_its_last_response(node: GatewayNode) -> None:
    # The cancel is sent once the first pending response is in; on a loaded machine the
    # node may have sent all MAX responses by the time it arrives (then nothing is left to
    # cancel and the find ends 0xA700), so a few tries; a node that ignores C-CANCEL fails
    # every one.
    tries = []
    for _ in range(5):
        statuses = _find_cancelled_after_first_response(node)
        tries.append((len(statuses), f"0x{statuses[-1]:04X}"))
        if statuses[-1] == 0xFE00:
            assert len(statuses) - 1 < MAX, "cancel did not stop the responses"
            return
        assert statuses[-1] == 0xA700 and len(statuses) - 1 == MAX, tries
    raise AssertionError(f"C-CANCEL never ended the find: (responses, final status) {tries}")


@pytest.mark.parametrize(
    "value",
    [
        "%",
        "_",
        "%%",
        "'",
        "''",
        "\\'",
        "' OR '1'='1",
        "x'; DROP TABLE studies; --",
        "1 OR 1=1",
        "%' --",
        "*'*",
        "?%?",
        "[!a]*",
        '"',
        ");--",
    ],
)
def test_metacharacter_keys_are_literal_text(node: GatewayNode, value: str) -> None:
    for keyword, level in (
        ("PatientID", "STUDY"),
        ("AccessionNumber", "STUDY"),
        ("StudyDescription", "STUDY"),
        ("SeriesDescription", "SERIES"),
        ("PatientName", "IMAGE"),
    ):
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        ds.StudyInstanceUID = ""
        if level != "STUDY":
            ds.SeriesInstanceUID = ""
        if level == "IMAGE":
            ds.SOPInstanceUID = ""
        setattr(ds, keyword, value)
        statuses, found = c_find(node, ds)
        assert statuses[-1] in (0x0000, 0xA900, 0xC000), (keyword, value, statuses[-1])
        assert found == [], f"{keyword}={value!r} matched {len(found)}"
    # the index is intact and still answers
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.PatientID = "PID-Q"
    assert c_find(node, ds)[0] == [0xFF00, 0x0000]


def test_invalid_level_is_refused_and_audited(node: GatewayNode) -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel = "EVERYTHING"
    ds.PatientName = "*"
    statuses, found = c_find(node, ds)
    assert found == [] and len(statuses) == 1
    assert statuses[0] >= 0xA000 or 0xC000 <= statuses[0] <= 0xCFFF, hex(statuses[0])
    rows = audit(node, "c-find")
    assert any(r["outcome"] != "success" for r in rows), rows[:3]


def c_move(node: GatewayNode, destination: str) -> int:
    assoc = associate(node, MOVE)
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.PatientID = "PID-Q"
        ds.StudyInstanceUID = ""
        responses = list(assoc.send_c_move(ds, destination, MOVE))
        assert responses and "Status" in responses[-1][0], node.log()
        return int(responses[-1][0].Status)
    finally:
        assoc.release()


def test_move_to_ourselves_unknown_and_foreign_is_refused_and_audited(
    node: GatewayNode,
) -> None:
    started = time.monotonic()
    assert c_move(node, "GATEWAY") == 0xA801  # a loop back to us
    assert c_move(node, "NOWHERE") == 0xA801
    assert c_move(node, "PRIVATE") == 0x0124  # configured, but not for this caller
    assert time.monotonic() - started < 30
    rows = [r for r in audit(node, "c-move") if r["calling_ae_title"] == "WS"]
    refused = [r for r in rows if r["outcome"] != "success"]
    assert len(refused) >= 3, rows
    statuses = {r["status"] for r in refused}
    assert {0xA801, 0x0124} <= statuses, statuses
    assert node.cli("audit", "verify").returncode == 0
    # nothing was sent anywhere by a refused move
    assert audit(node, "sub-operation") == []
