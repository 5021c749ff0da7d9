"""Query/retrieve against a real node with DCMTK findscu/movescu/getscu (PS3.4 Annex C).

One node holds three studies; Orthanc stands in for an upstream PACS holding a fourth.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from tests.support.datasets import make_ct_study, sop_instance_uids
from tests.support.node import GatewayNode, render_toml
from tests.support.peers import Orthanc, StoreSCP, dcmtk, free_port

STUDIES = {
    "a": {"patient_id": "PID-A", "patient_name": "Alpha^Anna", "StudyDate": "20240110"},
    "b": {"patient_id": "PID-B", "patient_name": "Beta^Bob", "StudyDate": "20240215"},
    "c": {"patient_id": "PID-A", "patient_name": "Alpha^Anna", "StudyDate": "20240320"},
}


class RefusingSCP:
    """A pynetdicom Storage SCP answering 0xA700 for one SOP Instance UID."""

    def __init__(self, refuse: str) -> None:
        self.refuse = refuse
        self.port = free_port()
        self.received: list[str] = []
        ae = AE(ae_title="PARTIAL")
        ae.supported_contexts = StoragePresentationContexts
        self.ae = ae

    def _store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid == self.refuse:
            return 0xA700
        self.received.append(uid)
        return 0x0000

    def __enter__(self) -> RefusingSCP:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("qr")
    files = {
        key: make_ct_study(
            tmp / key,
            3,
            patient_id=v["patient_id"],
            patient_name=v["patient_name"],
            study_date=v["StudyDate"],
            accession_number=f"ACC-{key}",
            StudyDescription=f"Study {key} 100%_x",
        )
        for key, v in STUDIES.items()
    }
    upstream_files = make_ct_study(tmp / "up", 2, patient_id="PID-U", patient_name="Up^Una")
    storescp = StoreSCP(tmp / "ws", aet="WS").start()
    partial = RefusingSCP(sop_instance_uids(files["b"])[1]).__enter__()
    node = GatewayNode(
        tmp / "node",
        allow=[{"called_ae": "GATEWAY", "calling_ae": ["*"], "addresses": ["127.0.0.1"]}],
    )
    orthanc = Orthanc(tmp, modalities={"gw": ("GATEWAY", "127.0.0.1", node.port)}).start()
    qr = {
        "max_results": 50,
        "move_destinations": [
            {"name": "ws", "ae_title": "WS", "port": storescp.port},
            {"name": "partial", "ae_title": "PARTIAL", "port": partial.port},
            {
                "name": "ws-only",
                "ae_title": "WSONLY",
                "port": storescp.port,
                "allowed_callers": ["SOMEONE"],
            },
        ],
        "upstream": {"ae_title": "ORTHANC", "port": orthanc.dicom_port},
    }
    text = node.config_path.read_text()
    node.config_path.write_text(text + "\n" + render_toml({"qr": qr}))
    with node:
        proc = dcmtk(
            "storescu",
            "-aet",
            "MODALITY",
            "-aec",
            "GATEWAY",
            "127.0.0.1",
            str(node.port),
            *[str(f) for fs in files.values() for f in fs],
        )
        assert proc.returncode == 0, proc.stderr
        for f in upstream_files:
            orthanc.request("POST", "/instances", f.read_bytes())
        yield {
            "node": node,
            "files": files,
            "storescp": storescp,
            "partial": partial,
            "orthanc": orthanc,
            "upstream_files": upstream_files,
            "tmp": tmp,
        }
    partial.__exit__()
    storescp.stop()
    orthanc.stop()


def find(node: GatewayNode, *keys: str, model: str = "-S") -> tuple[list[str], str]:
    args: list[str] = []
    for k in keys:
        args += ["-k", k]
    proc = dcmtk(
        "findscu", model, "-v", "-aet", "WS", "-aec", "GATEWAY", "127.0.0.1", str(node.port), *args
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    blocks = out.split("Find Response:")[1:]
    return [b for b in blocks if "Pending" in b.splitlines()[0]], out


def values(blocks: list[str], tag: str) -> list[str]:
    out = []
    for b in blocks:
        m = re.search(re.escape(tag) + r" \w\w \[([^\]]*)\]", b)
        # DCMTK prints a received value with its padding: UI values end in one NUL (PS3.5 6.2)
        out.append(m.group(1).strip(" \x00") if m else "")
    return out


def study_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_find_matching_rules_levels_and_models(world: dict[str, Any]) -> None:
    node, files = world["node"], world["files"]
    uid_a, uid_b, uid_c = (study_uid(files[k]) for k in "abc")
    q = (
        "QueryRetrieveLevel=STUDY",
        "StudyInstanceUID",
        "PatientName",
        "StudyDate",
        "NumberOfStudyRelatedInstances",
        "ModalitiesInStudy",
        "RetrieveAETitle",
    )
    # universal: every local study
    blocks, _ = find(node, *q)
    assert {uid_a, uid_b, uid_c} <= set(values(blocks, "(0020,000d)")), _
    # single value (PN case-insensitive), wildcard * and ?, date range, UID list
    assert values(find(node, *q[:2], "PatientName=alpha^anna")[0], "(0020,000d)") == sorted(
        [uid_a, uid_c]
    )
    assert len(find(node, *q[:2], "PatientName=B*")[0]) == 1
    assert len(find(node, *q[:2], "PatientName=Bet?^Bob")[0]) == 1
    assert len(find(node, *q[:2], "PatientName=Bet?^Bo")[0]) == 0
    assert len(find(node, "QueryRetrieveLevel=STUDY", "AccessionNumber=acc-a")[0]) == 0  # exact
    assert len(find(node, *q[:2], "StudyDate=20240201-20240331")[0]) == 2
    assert len(find(node, *q[:2], "StudyDate=-20240110")[0]) == 1
    assert len(find(node, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid_a}\\{uid_b}")[0]) == 2
    blocks, _ = find(node, *q, f"StudyInstanceUID={uid_a}")
    assert values(blocks, "(0020,1208)") == ["3"]
    assert values(blocks, "(0008,0061)") == ["CT"]
    assert values(blocks, "(0008,0054)") == ["GATEWAY"]
    # patient root: PATIENT level with counts, then SERIES and IMAGE
    blocks, _ = find(
        node,
        "QueryRetrieveLevel=PATIENT",
        "PatientID=PID-A",
        "NumberOfPatientRelatedStudies",
        "PatientName",
        model="-P",
    )
    assert values(blocks, "(0020,1200)") == ["2"]
    blocks, _ = find(
        node,
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={uid_b}",
        "SeriesInstanceUID",
        "Modality",
        "NumberOfSeriesRelatedInstances",
        model="-P",
    )
    assert values(blocks, "(0020,1209)") == ["3"]
    blocks, _ = find(
        node,
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={uid_b}",
        "SOPInstanceUID",
        "InstanceNumber=2",
    )
    assert values(blocks, "(0008,0018)") == [uid_of(files["b"][1])]
    # study root has no PATIENT level
    _, out = find(node, "QueryRetrieveLevel=PATIENT", "PatientID")
    assert "DataSetDoesNotMatchSOPClass" in out, out
    audit = node.cli_json("audit", "list", "--type", "c-find", "--limit", "100")
    assert audit and audit[0]["calling_ae_title"] == "WS"
    assert "PatientName" in str(audit)


def test_hostile_keys_are_literal_and_bounded(world: dict[str, Any]) -> None:
    node = world["node"]
    for hostile in ["%", "_", "'", "' OR '1'='1", "x'; DROP TABLE studies; --", "%%\\__", "[a]*"]:
        blocks, _ = find(node, "QueryRetrieveLevel=STUDY", f"PatientName={hostile}")
        assert blocks == [], hostile
        blocks, _ = find(node, "QueryRetrieveLevel=STUDY", f"StudyDescription={hostile}")
        assert blocks == [], hostile
    assert len(find(node, "QueryRetrieveLevel=STUDY", "StudyDescription=*100%_x")[0]) == 3
    blocks, _ = find(node, "QueryRetrieveLevel=IMAGE", "SOPInstanceUID", "PatientName=*")
    assert len(blocks) <= 50
    assert len(find(node, "QueryRetrieveLevel=STUDY", "PatientName=*")[0]) >= 3  # still there


def move(node: GatewayNode, dest: str, uid: str) -> str:
    proc = dcmtk(
        "movescu",
        "-S",
        "-v",
        "-aet",
        "WS",
        "-aec",
        "GATEWAY",
        "-aem",
        dest,
        "127.0.0.1",
        str(node.port),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={uid}",
    )
    return proc.stdout + proc.stderr


def test_move_complete_partial_unknown_and_refused(world: dict[str, Any]) -> None:
    node, files = world["node"], world["files"]
    out = move(node, "WS", study_uid(files["a"]))
    assert "Success" in out, out
    assert len(world["storescp"].wait_for_files(3)) >= 3
    out = move(node, "PARTIAL", study_uid(files["b"]))
    assert "Final Move Response (Warning: SubOperationsCompleteOneOrMoreFailures)" in out, out
    assert len(world["partial"].received) == 2
    out = move(node, "NOWHERE", study_uid(files["a"]))
    assert "MoveDestinationUnknown" in out or "a801" in out.lower(), out
    out = move(node, "WSONLY", study_uid(files["a"]))
    assert "0x124" in out, out
    moves = node.cli_json("audit", "list", "--type", "c-move", "--limit", "50")
    assert {r["outcome"] for r in moves} >= {"success", "failure", "refused", "started"}
    subs = node.cli_json("audit", "list", "--type", "sub-operation", "--limit", "50")
    assert {r["outcome"] for r in subs} == {"success", "failure"}
    assert node.cli("audit", "verify").returncode == 0


def test_get_with_and_without_storage_role(world: dict[str, Any]) -> None:
    node, files, tmp = world["node"], world["files"], world["tmp"]
    out_dir = tmp / "get"
    out_dir.mkdir()
    proc = dcmtk(
        "getscu",
        "-S",
        "-v",
        "-aet",
        "WS",
        "-aec",
        "GATEWAY",
        "-od",
        str(out_dir),
        "127.0.0.1",
        str(node.port),
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={study_uid(files['c'])}",
        "-k",
        "SeriesInstanceUID=",
    )
    assert proc.returncode == 0, proc.stderr
    # a SERIES-level C-GET with the series key universal selects nothing unique: refused
    proc = dcmtk(
        "getscu",
        "-S",
        "-v",
        "-aet",
        "WS",
        "-aec",
        "GATEWAY",
        "-od",
        str(out_dir),
        "127.0.0.1",
        str(node.port),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_uid(files['c'])}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(list(out_dir.iterdir())) == 3
    # no Storage SCP role negotiated: every sub-operation fails, 0xA702
    ae = AE(ae_title="WS")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="GATEWAY")
    assert assoc.is_established
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid(files["c"])
    final = [s for s, _ in assoc.send_c_get(ds, StudyRootQueryRetrieveInformationModelGet)][-1]
    assoc.release()
    assert final.Status == 0xA702
    assert final.NumberOfFailedSuboperations == 3


def test_find_cancel(world: dict[str, Any]) -> None:
    node = world["node"]
    ae = AE(ae_title="WS")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="GATEWAY")
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.SOPInstanceUID = ""
    statuses = []
    cancelled = threading.Event()
    for status, _ in assoc.send_c_find(ds, "1.2.840.10008.5.1.4.1.2.2.1", msg_id=7):
        statuses.append(status.Status)
        if not cancelled.is_set():
            assoc.send_c_cancel(7, context_id=assoc.accepted_contexts[0].context_id)
            cancelled.set()
    assoc.release()
    assert statuses[-1] in (0xFE00, 0x0000)
    assert len(statuses) >= 2


def test_upstream_study_found_and_moved(world: dict[str, Any]) -> None:
    node, up = world["node"], world["upstream_files"]
    uid = study_uid(up)
    blocks, _ = find(node, "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID=PID-U")
    assert values(blocks, "(0020,000d)") == [uid]
    before = len(world["storescp"].files())
    out = move(node, "WS", uid)
    assert "Success" in out, out
    assert len(world["storescp"].wait_for_files(before + 2)) >= before + 2
