"""Federated query/retrieve between two real nodes on loopback, with DCMTK at both ends.

Node A holds the studies; its ``[[qr.grants]]`` let the workstation WS at node B query and
retrieve CT studies with the ``basic`` profile, and nobody else. Node B fans WS's C-FIND,
C-MOVE and C-GET out to A over the peer channel, and to a third peer (node-c) whose
endpoint accepts TCP connections and never answers. DCMTK ``storescp`` is the specialist's
workstation.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from gateway.crypto.tls import ca_init
from gateway.deid import ProjectKey
from tests.e2e.test_forward import storescu
from tests.e2e.test_peer import _trust
from tests.e2e.test_qr import study_uid, values
from tests.support.datasets import make_ct_study, sop_instance_uids
from tests.support.node import GatewayNode, render_toml
from tests.support.peers import StoreSCP, dcmtk, free_port

PATIENT_NAME = "Nakamura^Hiroshi"
PATIENT_ID = "PID-FED-4711"
SILENT_TIMEOUT = 2.0  # node-c's per-peer timeout at B


def _add_qr(node: GatewayNode, qr: dict[str, Any]) -> None:
    node.config_path.write_text(node.config_path.read_text() + "\n" + render_toml({"qr": qr}))


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("fed")
    ca_init(tmp / "ca")
    secret = tmp / "project.secret"
    secret.write_text("a-project-secret-for-federation-0123456789abcdef\n")
    secret.chmod(0o600)
    studies = {
        "ct": make_ct_study(
            tmp / "ct",
            3,
            patient_id=PATIENT_ID,
            patient_name=PATIENT_NAME,
            AccessionNumber="ACC-FED-1",
        ),
        "ct2": make_ct_study(
            tmp / "ct2", 2, patient_id=PATIENT_ID, patient_name=PATIENT_NAME, seed=2
        ),
        "mr": make_ct_study(  # a study A's grant does not cover (Modality MR)
            tmp / "mr", 1, patient_id=PATIENT_ID, patient_name=PATIENT_NAME, Modality="MR"
        ),
    }
    # node-c: a peer whose endpoint accepts connections and never says a word
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    a_port, b_port = free_port(), free_port()
    url = "https://127.0.0.1:{}".format
    workstation = StoreSCP(tmp / "ws", aet="WS", extra_args=["-d"]).start()
    a = GatewayNode(
        tmp / "a",
        name="node-a",
        ae_title="NODEA",
        peer={"port": a_port},
        peers=[{"name": "node-b", "url": url(b_port)}],
        deid={"secret_file": str(secret)},
    )
    b = GatewayNode(
        tmp / "b",
        name="node-b",
        ae_title="NODEB",
        peer={"port": b_port},
        peers=[
            {"name": "node-a", "url": url(a_port)},
            {"name": "node-c", "url": url(silent.getsockname()[1])},
        ],
    )
    c = GatewayNode(tmp / "c", name="node-c", ae_title="NODEC")
    _add_qr(
        a,
        {
            "grants": [
                {
                    "name": "b-workstation",
                    "peers": ["node-b"],
                    "callers": ["WS"],
                    "match": {"attribute": "Modality", "one_of": ["CT"]},
                    "profile": "basic",
                }
            ]
        },
    )
    _add_qr(
        b,
        {
            "federation": [
                {"peer": "node-a", "callers": ["WS", "INTRUDER"], "timeout": 10},
                {"peer": "node-c", "timeout": SILENT_TIMEOUT, "retrieve_timeout": 5},
            ],
            "move_destinations": [{"name": "ws", "ae_title": "WS", "port": workstation.port}],
        },
    )
    for node in (a, b, c):
        node.cli("keys", "init", "--ca", str(tmp / "ca"), check=True)
    _trust(b, a)
    _trust(a, b)
    _trust(c, b)
    with a, b:
        storescu(a, [f for fs in studies.values() for f in fs])
        yield {
            "a": a,
            "b": b,
            "studies": studies,
            "key": ProjectKey.from_file(secret),
            "ws": workstation,
            "tmp": tmp,
        }
    workstation.stop()
    silent.close()


def find_at(node: GatewayNode, caller: str, *keys: str) -> tuple[list[str], str, float]:
    args = [a for k in keys for a in ("-k", k)]
    started = time.monotonic()
    proc = dcmtk(
        "findscu", "-S", "-v", "-aet", caller, "-aec", node.ae_title, "127.0.0.1",
        str(node.port), *args,
    )  # fmt: skip
    took = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    blocks = [b for b in out.split("Find Response:")[1:] if "Pending" in b.splitlines()[0]]
    return blocks, out, took


def move_at(node: GatewayNode, caller: str, uid: str) -> str:
    proc = dcmtk(
        "movescu", "-S", "-v", "-aet", caller, "-aec", node.ae_title, "-aem", "WS",
        "127.0.0.1", str(node.port), "-k", "QueryRetrieveLevel=STUDY",
        "-k", f"StudyInstanceUID={uid}",
    )  # fmt: skip
    return proc.stdout + proc.stderr


def audit(node: GatewayNode, event_type: str) -> list[dict[str, Any]]:
    return list(node.cli_json("audit", "list", "--type", event_type, "--limit", "500"))


def assert_deidentified(path: Path, original: Path, key: ProjectKey) -> None:
    data = path.read_bytes()
    ds = pydicom.dcmread(path)
    src = pydicom.dcmread(original, stop_before_pixels=True)
    assert ds.PatientIdentityRemoved == "YES"
    assert str(ds.PatientName) != PATIENT_NAME and str(ds.PatientID) != PATIENT_ID
    assert ds.SOPInstanceUID == key.uid(str(src.SOPInstanceUID))
    assert ds.StudyInstanceUID == key.uid(str(src.StudyInstanceUID))
    assert ds.SeriesInstanceUID == key.uid(str(src.SeriesInstanceUID))
    for marker in (
        PATIENT_ID,
        "Nakamura",
        "ACC-FED-1",
        str(src.SOPInstanceUID),
        str(src.StudyInstanceUID),
        str(src.SeriesInstanceUID),
    ):
        assert marker.encode() not in data, marker


STUDY_KEYS = (
    "QueryRetrieveLevel=STUDY",
    "StudyInstanceUID",
    "PatientName",
    "PatientID",
    "StudyDate",
    "AccessionNumber",
    "NumberOfStudyRelatedInstances",
    "RetrieveAETitle",
)


def test_refused_requester_gets_nothing_and_is_audited_on_a(fed: dict[str, Any]) -> None:
    a, b, key = fed["a"], fed["b"], fed["key"]
    keyed = key.uid(study_uid(fed["studies"]["ct"]))
    blocks, out, _ = find_at(b, "INTRUDER", *STUDY_KEYS)
    assert blocks == [], out
    out = move_at(b, "INTRUDER", keyed)
    assert "Final Move Response (Unknown Status: 0x124)" in out, out
    assert fed["ws"].files() == []
    refused = [r for r in audit(a, "c-find") + audit(a, "c-move") if r["outcome"] == "refused"]
    assert {(r["event_type"], r["calling_ae_title"]) for r in refused} == {
        ("c-find", "INTRUDER"),
        ("c-move", "INTRUDER"),
    }
    assert all(r["detail"]["peer"] == "node-b" for r in refused)
    assert all(r["detail"]["reason"] == "peer-caller-not-granted" for r in refused)
    moves_b = [r for r in audit(b, "c-move") if r["calling_ae_title"] == "INTRUDER"]
    # the local look-up (nothing), the peers' answers, B's answer
    assert [r["outcome"] for r in moves_b] == ["started", "refused", "refused"], moves_b
    asked = next(r for r in moves_b if "peers" in r["detail"])
    assert asked["detail"]["peers"]["node-a"]["outcome"] == "refused"
    assert asked["detail"]["peers"]["node-c"]["outcome"] == "timeout"


def test_find_at_b_answers_from_a_deidentified_within_the_peer_timeout(
    fed: dict[str, Any],
) -> None:
    a, b, key, studies = fed["a"], fed["b"], fed["key"], fed["studies"]
    blocks, out, took = find_at(b, "WS", *STUDY_KEYS)
    uids = values(blocks, "(0020,000d)")
    expected = {key.uid(study_uid(studies["ct"])), key.uid(study_uid(studies["ct2"]))}
    assert set(uids) == expected, out  # the MR study is not granted; nothing original
    assert study_uid(studies["ct"]) not in out and PATIENT_ID not in out
    assert "Nakamura" not in out and "ACC-FED-1" not in out
    assert set(values(blocks, "(0008,0054)")) == {"NODEB"}  # retrievable from B
    assert sorted(values(blocks, "(0020,1208)")) == ["2", "3"]
    assert set(values(blocks, "(0008,0050)")) == {""}  # accession removed by the profile
    # node-c never answers: B's answer waits for it no longer than its timeout
    assert SILENT_TIMEOUT - 0.5 < took < SILENT_TIMEOUT + 6, took
    # matching at A is on what the requester would receive: the original name finds nothing
    blocks, out, _ = find_at(b, "WS", "QueryRetrieveLevel=STUDY", "PatientName=Nakamura*")
    assert blocks == [], out
    pseudonym = re.search(r"\(0010,0010\) PN \[([^\]]*)\]", find_at(b, "WS", *STUDY_KEYS)[1])
    assert pseudonym is not None
    blocks, _, _ = find_at(
        b, "WS", "QueryRetrieveLevel=STUDY", "StudyInstanceUID", f"PatientName={pseudonym[1]}"
    )
    assert len(blocks) == 2
    finds_b = [r for r in audit(b, "c-find") if r["calling_ae_title"] == "WS"]
    assert finds_b[0]["detail"]["peers"]["node-c"]["outcome"] == "timeout"
    assert finds_b[0]["detail"]["peers"]["node-a"] == {"outcome": "answered", "matches": 2}
    assert finds_b[0]["detail"]["level"] == "STUDY"
    assert "PatientName" in finds_b[0]["detail"]["keys"]
    finds_a = [r for r in audit(a, "c-find") if r["calling_ae_title"] == "WS"]
    assert finds_a and finds_a[0]["outcome"] == "success"
    assert finds_a[0]["detail"]["peer"] == "node-b" and finds_a[0]["detail"]["level"] == "STUDY"
    assert 'gateway_qr_peer_requests_total{outcome="timeout",peer="node-c"}' in b.metrics()


def test_move_at_b_delivers_a_study_held_at_a_deidentified(fed: dict[str, Any]) -> None:
    a, b, key, ws = fed["a"], fed["b"], fed["key"], fed["ws"]
    originals = fed["studies"]["ct"]
    keyed = key.uid(study_uid(originals))
    out = move_at(b, "WS", keyed)
    assert "Final Move Response (Success)" in out, out
    assert "Pending" in out  # progress while the package travels and after each instance
    received = ws.wait_for_files(3)
    assert len(received) == 3
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in received}
    for original in originals:
        assert_deidentified(by_uid[key.uid(sop_instance_uids([original])[0])], original, key)
    # C-STORE sub-operations name the move originator (PS3.7 9.3.1.1)
    assert re.search(r"Move Originator AE Title\s*:\s*WS", ws.log(400)), ws.log(80)
    # audit on B: the request to the peers, the move and each sub-operation
    moves_b = [r for r in audit(b, "c-move") if r["calling_ae_title"] == "WS"]
    assert {r["outcome"] for r in moves_b} >= {"peer-requested", "success"}
    requested = next(r for r in moves_b if r["outcome"] == "peer-requested")
    assert requested["detail"]["peers"]["node-a"]["instances"] == 3
    assert requested["detail"]["destination"] == "WS"
    done = next(r for r in moves_b if r["outcome"] == "success")
    assert done["detail"]["completed"] == 3 and done["study_instance_uid"] == keyed
    subs_b = [r for r in audit(b, "sub-operation") if r["study_instance_uid"] == keyed]
    assert len(subs_b) == 3 and {r["outcome"] for r in subs_b} == {"success"}
    # audit on A: the move as A saw it (original study) and each instance sent in a package
    moves_a = [r for r in audit(a, "c-move") if r["calling_ae_title"] == "WS"]
    assert moves_a and moves_a[0]["outcome"] == "started"
    assert moves_a[0]["study_instance_uid"] == study_uid(originals)
    assert moves_a[0]["detail"]["profiles"] == ["basic"]
    packages = set(moves_a[0]["detail"]["packages"])
    subs_a = [r for r in audit(a, "sub-operation") if r["delivery_id"] in packages]
    assert sorted(r["sop_instance_uid"] for r in subs_a) == sorted(by_uid)
    assert a.cli("audit", "verify").returncode == 0
    assert b.cli("audit", "verify").returncode == 0


def test_get_at_b_of_a_study_held_at_a(fed: dict[str, Any]) -> None:
    b, key, tmp = fed["b"], fed["key"], fed["tmp"]
    originals = fed["studies"]["ct2"]
    out_dir = tmp / "get"
    out_dir.mkdir()
    proc = dcmtk(
        "getscu", "-S", "-v", "-aet", "WS", "-aec", "NODEB", "-od", str(out_dir),
        "127.0.0.1", str(b.port), "-k", "QueryRetrieveLevel=STUDY",
        "-k", f"StudyInstanceUID={key.uid(study_uid(originals))}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    received = sorted(out_dir.iterdir())
    assert len(received) == 2, proc.stdout + proc.stderr
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in received}
    for original in originals:
        assert_deidentified(by_uid[key.uid(sop_instance_uids([original])[0])], original, key)
    gets = [r for r in audit(b, "c-get") if r["outcome"] == "success"]
    assert gets and gets[-1]["detail"]["completed"] == 2
