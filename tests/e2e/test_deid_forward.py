"""De-identification in the forwarding path: storescu -> node (route with a profile) -> Orthanc."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom

from gateway.deid import ProjectKey, leak_check
from tests.e2e.test_forward import orthanc_destination, storescu
from tests.support.datasets import make_ct_study
from tests.support.node import GatewayNode
from tests.support.peers import Orthanc

PATIENT_NAME = "Kowalczyk^Agnieszka^Maria"
PATIENT_ID = "PAT-77031-XK"


def _study(tmp_path: Path, n: int) -> list[Path]:
    return make_ct_study(
        tmp_path / "study",
        n,
        seed=21,
        patient_id=PATIENT_ID,
        patient_name=PATIENT_NAME,
        AccessionNumber="ACC-99812",
        InstitutionName="St Elsewhere Clinic",
        ReferringPhysicianName="Strangelove^Merkwurdig",
        PatientBirthDate="19610415",
        StudyDescription="CT Thorax Kowalczyk follow-up",
    )


def test_basic_profile_applied_before_anything_leaves(tmp_path: Path, orthanc: Orthanc) -> None:
    files = _study(tmp_path, 12)
    secret = tmp_path / "project.secret"
    secret.write_text("a-project-secret-for-this-test-0123456789abcdef\n")
    secret.chmod(0o600)
    node = GatewayNode(
        tmp_path / "node",
        destinations=[orthanc_destination(orthanc)],
        routes=[
            {"name": "research", "destinations": ["pacs"], "quiet_seconds": 0.5, "profile": "basic"}
        ],
        deid={"secret_file": str(secret)},
    )
    with node:
        storescu(node, files)
        (done,) = node.wait_for_deliveries("delivered", 1, timeout=120)
        attempts = node.cli_json("audit", "list", "--type", "delivery-attempt")
    assert done["profile"] == "basic" and done["sent"] == 12
    prepared = attempts[-1]["detail"]["prepared"]
    assert prepared["profile"] == "basic" and prepared["instances"] == 12
    assert len(prepared["profile_sha256"]) == 64

    key = ProjectKey.from_file(secret)
    originals = {str(pydicom.dcmread(f).SOPInstanceUID): pydicom.dcmread(f) for f in files}
    expected_uids = {key.uid(uid) for uid in originals}
    ids = orthanc.instances()
    assert len(ids) == 12
    study_uids = set()
    for oid in ids:
        data = orthanc.instance_file(oid)
        out = pydicom.dcmread(BytesIO(data))
        assert str(out.SOPInstanceUID) in expected_uids  # keyed, deterministic pseudonym
        assert str(out.SOPInstanceUID).startswith("2.25.")
        assert out.PatientIdentityRemoved == "YES"
        study_uids.add(str(out.StudyInstanceUID))
        for original in originals.values():
            assert leak_check(original, data) == []
        for marker in (
            PATIENT_NAME.split("^")[0],
            PATIENT_ID,
            "ACC-99812",
            "Elsewhere",
            "Strangelove",
            "19610415",
        ):
            assert marker.encode() not in data
    assert len(study_uids) == 1  # references stay consistent across the study
    assert study_uids == {key.uid(str(next(iter(originals.values())).StudyInstanceUID))}


def test_a_leaking_profile_quarantines_and_a_fixed_one_delivers(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    files = _study(tmp_path, 3)
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    leaky = profiles / "site.toml"
    basic = Path(__file__).resolve().parents[2] / "deid_profiles" / "basic.toml"
    leaky.write_text(
        basic.read_text().replace('name = "basic"', 'name = "site"')
        + '\n[[item]]\nname = "oops"\ntag = "PatientName"\naction = "keep"\n'
    )
    node = GatewayNode(
        tmp_path / "node",
        destinations=[orthanc_destination(orthanc)],
        routes=[{"name": "out", "destinations": ["pacs"], "quiet_seconds": 0.5, "profile": "site"}],
        deid={"profiles_dirs": [str(profiles)]},
    )
    with node:
        storescu(node, files)
        (held,) = node.wait_for_deliveries("quarantined", 1, timeout=60)
        assert orthanc.count_instances() == 0  # nothing left the site
        assert "Kowalczyk" not in held["last_error"] and PATIENT_ID not in held["last_error"]
        assert "PatientName" in held["last_error"] or "(0010,0010)" in held["last_error"]
        listed = node.cli_json("queue", "list", "--state", "quarantined")
        assert [d["id"] for d in listed] == [held["id"]]
        leaky.write_text(basic.read_text().replace('name = "basic"', 'name = "site"'))
        node.cli("queue", "retry", held["id"], check=True)
        (done,) = node.wait_for_deliveries("delivered", 1, timeout=60)
    assert done["id"] == held["id"]
    assert orthanc.count_instances() == 3
    assert "Kowalczyk" not in node.log_path.read_text()
