"""The answering node's federation logic on a real (SQLite) index, without the network:
an answer row is de-identified exactly as the instance itself will be, grants filter studies,
query-only grants refuse retrieves, a requester no grant lists is refused and audited, and a
retrieve makes one delivery per series with the grant's profile."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from gateway.clock import SystemClock
from gateway.config import GatewayConfig, load_config
from gateway.deid import ProjectKey, deidentify_bytes, load_profile
from gateway.errors import QueryRetrieveError
from gateway.index.db import Database
from gateway.index.models import AuditEvent, Delivery, Instance, Series, Study
from gateway.qr.matching import parse as parse_matcher
from gateway.qr.policy import deidentify_row
from gateway.qr.responder import PeerQueryResponder, peer_destination
from gateway.qr.service import QRService
from gateway.spool.store import Spool
from tests.support.datasets import build_instance

KEY = ProjectKey(b"k" * 32)

CONFIG = """
[node]
name = "node-a"
state_dir = "state"

[[peers]]
name = "node-b"
url = "https://127.0.0.1:8443"

[[qr.grants]]
name = "ct-deidentified"
peers = ["node-b"]
callers = ["WS"]
profile = "basic"
match = { attribute = "Modality", equals = "CT" }

[[qr.grants]]
name = "mr-look-only"
peers = ["node-b"]
callers = ["WS"]
retrieve = false
match = { attribute = "Modality", equals = "MR" }
"""


def test_an_answer_row_is_deidentified_as_its_instance_is() -> None:
    ds = build_instance(patient_id="PID-77", patient_name="Keller^Klara", AccessionNumber="A-77")
    ds.StudyDate = "20240301"
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    profile = load_profile("basic")
    encoded, _uid, _report = deidentify_bytes(buf.getvalue(), profile, KEY)
    sent = pydicom.dcmread(BytesIO(encoded))
    row = {
        "PatientID": "PID-77",
        "PatientName": "Keller^Klara",
        "StudyInstanceUID": str(ds.StudyInstanceUID),
        "SeriesInstanceUID": str(ds.SeriesInstanceUID),
        "SOPInstanceUID": str(ds.SOPInstanceUID),
        "SOPClassUID": str(ds.SOPClassUID),
        "StudyDate": "20240301",
        "AccessionNumber": "A-77",
        "Modality": "CT",
        "NumberOfStudyRelatedInstances": "1",
    }
    answer = deidentify_row(row, profile, KEY)
    for keyword in (
        "PatientID",
        "PatientName",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "Modality",
    ):
        assert answer[keyword] == str(sent.get(keyword, "") or ""), keyword
    assert answer["PatientID"] != "PID-77" and answer["StudyInstanceUID"] != row["StudyInstanceUID"]
    assert answer["StudyDate"] == str(sent.get("StudyDate", "") or "")
    assert answer["AccessionNumber"] == ""
    assert answer["NumberOfStudyRelatedInstances"] == "1"  # a count identifies nobody


@pytest.fixture
def node(tmp_path: Path) -> Iterator[dict[str, Any]]:
    path = tmp_path / "gw.toml"
    path.write_text(CONFIG)
    cfg: GatewayConfig = load_config(path)
    db = Database(cfg.database_url)
    db.migrate()
    now = datetime(2024, 5, 1, tzinfo=UTC)
    with db.session() as s:
        for study, modality, n_series in (("1.9.1", "CT", 2), ("1.9.2", "MR", 1)):
            s.add(
                Study(
                    study_instance_uid=study,
                    patient_id="PID-9",
                    patient_name="Weber^Wim",
                    modalities=modality,
                    first_received_at=now,
                    last_received_at=now,
                )
            )
            for j in range(n_series):
                series = f"{study}.{j}"
                s.add(
                    Series(series_instance_uid=series, study_instance_uid=study, modality=modality)
                )
                for k in range(2):
                    s.add(
                        Instance(
                            spool_key=f"k{study}{j}{k}".replace(".", ""),
                            sop_instance_uid=f"{series}.{k}",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                            transfer_syntax_uid="1.2.840.10008.1.2.1",
                            study_instance_uid=study,
                            series_instance_uid=series,
                            modality=modality,
                            size=1,
                            sha256="0" * 64,
                            received_at=now,
                            calling_ae_title="MOD",
                            called_ae_title="NODEA",
                            calling_address="127.0.0.1",
                            association_id="a",
                        )
                    )
    clock = SystemClock()
    qr = QRService(cfg, db=db, spool=Spool(tmp_path / "spool"), clock=clock)
    woken: list[bool] = []
    responder = PeerQueryResponder(
        cfg, qr=qr, db=db, clock=clock, key_of=lambda: KEY, on_delivery=lambda: woken.append(True)
    )
    yield {"db": db, "responder": responder, "woken": woken}
    db.dispose()


def _body(requester: str, **keys: str) -> dict[str, Any]:
    ds = Dataset()
    ds.QueryRetrieveLevel = keys.pop("level", "STUDY")
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return {"requester": requester, "model": "STUDY", "identifier": ds.to_json_dict()}


def _audit(db: Database) -> list[AuditEvent]:
    with db.session() as s:
        rows = list(s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars())
        s.expunge_all()
    return rows


def test_find_answers_granted_studies_each_as_its_grant_says(node: dict[str, Any]) -> None:
    answer = node["responder"].find(
        "node-b", "127.0.0.1", _body("WS", StudyInstanceUID="", PatientID="", PatientName="")
    )
    by_uid = {m["StudyInstanceUID"]: m for m in answer["matches"]}
    assert set(by_uid) == {KEY.uid("1.9.1"), "1.9.2"}  # CT keyed (basic), MR as it is
    assert by_uid["1.9.2"]["PatientName"] == "Weber^Wim"
    assert by_uid[KEY.uid("1.9.1")]["PatientName"] not in ("", "Weber^Wim")
    (row,) = [r for r in _audit(node["db"]) if r.event_type == "c-find"]
    assert (row.outcome, row.calling_ae_title) == ("success", "WS")


def test_a_requester_no_grant_lists_is_refused_and_audited(node: dict[str, Any]) -> None:
    with pytest.raises(QueryRetrieveError) as info:
        node["responder"].find("node-b", "127.0.0.1", _body("OTHER", StudyInstanceUID=""))
    assert (info.value.status, info.value.reason) == (0x0124, "peer-caller-not-granted")
    (row,) = _audit(node["db"])
    assert (row.event_type, row.outcome, row.calling_ae_title) == ("c-find", "refused", "OTHER")


def test_retrieve_one_delivery_per_series_and_query_only_grants(node: dict[str, Any]) -> None:
    responder, db = node["responder"], node["db"]
    answer = responder.retrieve(
        "node-b",
        "127.0.0.1",
        {**_body("WS", StudyInstanceUID=KEY.uid("1.9.1")), "service": "c-move"},
    )
    assert answer["instances"] == 4 and len(answer["packages"]) == 2 and node["woken"]
    with db.session() as s:
        made = list(s.execute(select(Delivery)).scalars())
        assert {(d.destination, d.profile, d.route_name, d.instance_count) for d in made} == {
            (peer_destination("node-b"), "basic", "qr:c-move", 2)
        }
    with pytest.raises(QueryRetrieveError) as info:
        responder.retrieve(
            "node-b", "127.0.0.1", {**_body("WS", StudyInstanceUID="1.9.2"), "service": "c-get"}
        )
    assert info.value.reason == "retrieve-not-granted"
    rows = [(r.event_type, r.outcome) for r in _audit(db)]
    assert rows == [("c-move", "started"), ("c-get", "refused")]


def test_keys_match_the_deidentified_values(node: dict[str, Any]) -> None:
    responder = node["responder"]
    by_original = responder.find(
        "node-b", "127.0.0.1", _body("WS", StudyInstanceUID="", PatientID="PID-9")
    )
    uids = {m["StudyInstanceUID"] for m in by_original["matches"]}
    assert uids == {"1.9.2"}  # the MR study answers with originals; the CT one is keyed
    pseudonym = deidentify_row({"PatientID": "PID-9"}, load_profile("basic"), KEY)["PatientID"]
    by_pseudonym = responder.find(
        "node-b", "127.0.0.1", _body("WS", StudyInstanceUID="", PatientID=pseudonym)
    )
    assert {m["StudyInstanceUID"] for m in by_pseudonym["matches"]} == {KEY.uid("1.9.1")}


def test_package_states_only_for_the_asking_peer(node: dict[str, Any]) -> None:
    responder, db = node["responder"], node["db"]
    body = {**_body("WS", StudyInstanceUID=KEY.uid("1.9.1")), "service": "c-move"}
    packages = responder.retrieve("node-b", "127.0.0.1", body)["packages"]
    with db.session() as s:
        s.get(Delivery, packages[0]).state = "quarantined"
    states = responder.package_states("node-b", "", {"packages": [*packages, "nope"]})["states"]
    assert states == {packages[0]: "quarantined", packages[1]: "pending"}
    assert responder.package_states("node-c", "", {"packages": packages}) == {"states": {}}
    with pytest.raises(QueryRetrieveError):
        responder.package_states("node-b", "", {"packages": "all"})


class _Peers:
    """The asking side's view of a peer that accepted two packages and then quarantined one
    and failed the other (a FederationClient's package_states)."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def package_states(self, peer: str, package_ids: list[str]) -> dict[str, str]:
        self.asked.append(list(package_ids))
        return {"p1": "quarantined", "p2": "failed"}


def test_the_asking_node_stops_waiting_for_packages_the_peer_gave_up(
    node: dict[str, Any],
) -> None:
    peers = _Peers()
    qr = node["responder"].qr
    qr.federation = peers
    matchers = {"StudyInstanceUID": parse_matcher("UI", "2.25.1")}
    started = time.monotonic()
    batches = list(
        qr._arrivals("STUDY", matchers, [("node-a", "p1"), ("node-a", "p2")], 120.0, lambda: False)
    )
    took = time.monotonic() - started
    assert peers.asked == [["p1", "p2"]]
    assert all(b == [] for b in batches)  # nothing arrived; progress ticks at most
    assert took < 15, took  # not the 120 s retrieve timeout
