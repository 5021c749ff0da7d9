"""Link faults between the node and its destination (FAULTS F12, F13), through the fault proxy."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.test_forward import storescu
from tests.support.datasets import make_ct_study, sha256_pixel, sop_instance_uids
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.node import GatewayNode
from tests.support.peers import Orthanc


def _node(tmp_path: Path, proxy: FaultProxy, orthanc: Orthanc) -> GatewayNode:
    return GatewayNode(
        tmp_path / "node",
        destinations=[
            {
                "name": "pacs",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": proxy.port,
                "dimse_timeout": 5,
                "network_timeout": 5,
            }
        ],
        routes=[{"name": "all", "destinations": ["pacs"], "quiet_seconds": 0.3}],
        worker={"backoff_initial": 0.3, "backoff_max": 1},
    )


def test_link_reset_mid_transfer_is_retried_without_duplicates(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    files = make_ct_study(tmp_path / "s", 40, rows=128, cols=128, seed=11)
    # the first two connections are reset after ~0.5 MB: mid-instance, mid-study
    with FaultProxy(orthanc.dicom_port, fault=Fault("reset", after=500_000, connections=2)) as p:
        with _node(tmp_path, p, orthanc) as node:
            storescu(node, files)
            (done,) = node.wait_for_deliveries("delivered", 1, timeout=90)
            shown = node.cli_json("queue", "show", done["id"])
    assert done["attempts"] >= 2
    assert any(a["outcome"] == "retryable_failure" for a in shown["attempt_log"])
    uids = orthanc.sop_instance_uids()
    assert sorted(uids) == sop_instance_uids(files)  # each exactly once
    by_uid = {sop_instance_uids([f])[0]: f for f in files}
    for oid in orthanc.instances():
        uid = orthanc.instance_tags(oid)["SOPInstanceUID"]
        assert sha256_pixel(orthanc.instance_file(oid)) == sha256_pixel(by_uid[uid])


def test_slow_link_is_not_a_timeout(tmp_path: Path, orthanc: Orthanc) -> None:
    files = make_ct_study(tmp_path / "s", 4, rows=512, cols=512, seed=12)  # ~2 MB
    # 400 KB/s: ~5 s of transfer with dimse_timeout 5 s; bytes keep moving, so no timeout
    with FaultProxy(orthanc.dicom_port, fault=Fault("throttle", rate=400_000)) as p:
        with _node(tmp_path, p, orthanc) as node:
            storescu(node, files)
            (done,) = node.wait_for_deliveries("delivered", 1, timeout=90)
    assert done["attempts"] == 1
    assert sorted(orthanc.sop_instance_uids()) == sop_instance_uids(files)
