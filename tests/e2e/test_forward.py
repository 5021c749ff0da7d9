"""storescu -> node -> Orthanc, with the real programs on loopback."""

from __future__ import annotations

from pathlib import Path

from tests.support.datasets import make_ct_study, sha256_pixel, sop_instance_uids
from tests.support.node import GatewayNode
from tests.support.peers import Orthanc, dcmtk


def orthanc_destination(orthanc: Orthanc) -> dict[str, object]:
    return {
        "name": "pacs",
        "ae_title": orthanc.aet,
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
    }


def storescu(node: GatewayNode, files: list[Path], *extra: str) -> None:
    proc = dcmtk(
        "storescu",
        "-aet",
        "MODALITY",
        "-aec",
        node.ae_title,
        *extra,
        "127.0.0.1",
        str(node.port),
        *[str(f) for f in files],
    )
    assert proc.returncode == 0, proc.stderr


def test_study_forwarded_to_orthanc(tmp_path: Path, orthanc: Orthanc) -> None:
    files = make_ct_study(tmp_path / "study", 200, seed=7)
    node = GatewayNode(
        tmp_path / "node",
        destinations=[orthanc_destination(orthanc)],
        routes=[{"name": "all", "destinations": ["pacs"], "quiet_seconds": 1}],
    )
    with node:
        storescu(node, files)
        delivered = node.wait_for_deliveries("delivered", 1, timeout=120)
        assert delivered[0]["sent"] == 200
    assert sorted(orthanc.sop_instance_uids()) == sorted(sop_instance_uids(files))
    by_uid = {sop_instance_uids([f])[0]: f for f in files}
    for oid in orthanc.instances():
        data = orthanc.instance_file(oid)
        uid = orthanc.instance_tags(oid)["SOPInstanceUID"]
        assert sha256_pixel(data) == sha256_pixel(by_uid[uid])
    assert node.cli("audit", "verify").returncode == 0
    _check_audit_filters(node, files)


def _check_audit_filters(node: GatewayNode, files: list[Path]) -> None:
    stores = node.cli_json("audit", "list", "--type", "c-store", "--limit", "1000")
    assert len(stores) == len(files)
    assert {r["outcome"] for r in stores} == {"success"}
    assert {r["calling_ae_title"] for r in stores} == {"MODALITY"}
    study = stores[0]["study_instance_uid"]
    by_study = node.cli_json("audit", "list", "--study", study, "--limit", "5000")
    assert {r["event_type"] for r in by_study} >= {"c-store", "route", "delivery-attempt"}
    assert len(node.cli_json("audit", "list", "--ae", "MODALITY", "--limit", "5000")) >= len(files)
    assert node.cli_json("audit", "list", "--ae", "NOBODY") == []
    assert node.cli_json("audit", "list", "--since", "2999-01-01") == []
    assert len(node.cli_json("audit", "list", "--until", "2999-01-01", "--limit", "10")) == 10
    text = node.cli("audit", "list", "--type", "route").stdout
    assert "route" in text and study in text
