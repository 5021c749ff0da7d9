"""Routing and forwarding behaviour end to end: stream and study routes, follow-ups, rules,
transfer-syntax fallback and bounded memory for a large multi-frame instance."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.e2e.test_forward import orthanc_destination, storescu
from tests.support.datasets import build_instance, make_ct_study, sop_instance_uids
from tests.support.node import GatewayNode
from tests.support.peers import Orthanc, StoreSCP


def test_stream_route_forwards_as_instances_arrive(tmp_path: Path, orthanc: Orthanc) -> None:
    files = make_ct_study(tmp_path / "study", 30, seed=3)
    node = GatewayNode(
        tmp_path / "node",
        destinations=[orthanc_destination(orthanc)],
        routes=[{"name": "er", "destinations": ["pacs"], "mode": "stream", "quiet_seconds": 3600}],
    )
    with node:
        storescu(node, files[:10])
        # the study is far from quiet (3600 s): only streaming can have sent these
        orthanc.wait_for_instances(10, timeout=30)
        storescu(node, files[10:])
        orthanc.wait_for_instances(30, timeout=30)
        rows = node.deliveries()
    assert sorted(orthanc.sop_instance_uids()) == sop_instance_uids(files)
    assert sum(r["sent"] for r in rows) == 30
    assert all(r["state"] == "delivered" for r in rows)


def test_late_instances_make_a_follow_up_delivery(tmp_path: Path, orthanc: Orthanc) -> None:
    files = make_ct_study(tmp_path / "study", 8, seed=4)
    node = GatewayNode(
        tmp_path / "node",
        destinations=[orthanc_destination(orthanc)],
        routes=[{"name": "all", "destinations": ["pacs"], "quiet_seconds": 1}],
    )
    with node:
        storescu(node, files[:5])
        first = node.wait_for_deliveries("delivered", 1, timeout=60)
        assert first[0]["instances"] == 5
        storescu(node, files[5:])
        both = node.wait_for_deliveries("delivered", 2, timeout=60)
    follow_up = [d for d in both if d["id"] != first[0]["id"]]
    assert [d["instances"] for d in follow_up] == [3]
    assert follow_up[0]["study_instance_uid"] == first[0]["study_instance_uid"]
    assert sorted(orthanc.sop_instance_uids()) == sop_instance_uids(files)


def test_rules_select_what_is_forwarded(tmp_path: Path, orthanc: Orthanc) -> None:
    study = generate_uid()
    out = tmp_path / "mixed"
    out.mkdir()
    sent = []
    for i, (modality, desc) in enumerate(
        [("CT", "HEAD"), ("CT", "SCOUT"), ("MR", "HEAD"), ("CT", "CHEST")]
    ):
        ds = build_instance(
            modality=modality,
            study_uid=study,
            instance_number=i + 1,
            SeriesDescription=desc,
            seed=i,
        )
        path = out / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sent.append((path, str(ds.SOPInstanceUID), modality, desc))
    node = GatewayNode(
        tmp_path / "node",
        destinations=[orthanc_destination(orthanc)],
        routes=[
            {
                "name": "ct-no-scout",
                "destinations": ["pacs"],
                "quiet_seconds": 1,
                "match": {
                    "all": [
                        {"attribute": "Modality", "equals": "CT"},
                        {"attribute": "CallingAETitle", "one_of": ["MODALITY", "OTHER"]},
                        {"not": {"attribute": "SeriesDescription", "regex": "(?i)scout"}},
                    ]
                },
            }
        ],
    )
    with node:
        storescu(node, [p for p, *_ in sent])
        node.wait_for_deliveries("delivered", 1, timeout=60)
    expected = sorted(uid for _, uid, m, d in sent if m == "CT" and d != "SCOUT")
    assert sorted(orthanc.sop_instance_uids()) == expected


def test_compressed_instance_is_decompressed_for_a_destination_that_refuses_it(
    tmp_path: Path,
) -> None:
    jpeg = Path(pydicom.data.get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    original = pydicom.dcmread(jpeg)
    # storescp accepts only uncompressed transfer syntaxes unless told otherwise
    with StoreSCP(tmp_path / "ws") as scp:
        node = GatewayNode(
            tmp_path / "node",
            destinations=[
                {"name": "ws", "ae_title": scp.aet, "host": "127.0.0.1", "port": scp.port}
            ],
            routes=[{"name": "all", "destinations": ["ws"], "quiet_seconds": 0.5}],
        )
        with node:
            storescu(node, [jpeg], "-xy")  # propose JPEG baseline: stored as sent
            node.wait_for_deliveries("delivered", 1, timeout=60)
        (received,) = scp.wait_for_files(1)
    got = pydicom.dcmread(received)
    assert got.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, "1.2.840.10008.1.2")
    assert got.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(got.pixel_array, original.pixel_array)


def _vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_large_multiframe_is_streamed_with_bounded_memory(tmp_path: Path, orthanc: Orthanc) -> None:
    frames, rows, cols = 200, 512, 512  # 100 MiB of pixel data
    ds = build_instance(rows=rows, cols=cols, seed=5)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.NumberOfFrames = frames
    rng = np.random.default_rng(5)
    ds.PixelData = rng.integers(0, 4096, size=(frames, rows, cols), dtype=np.uint16).tobytes()
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    del ds
    node = GatewayNode(
        tmp_path / "node",
        destinations=[orthanc_destination(orthanc)],
        routes=[{"name": "all", "destinations": ["pacs"], "quiet_seconds": 0.5}],
    )
    with node:
        time.sleep(1.0)
        baseline = _vm_hwm_mib(node.pid)
        storescu(node, [big])
        node.wait_for_deliveries("delivered", 1, timeout=120)
        peak = _vm_hwm_mib(node.pid)
    assert orthanc.count_instances() == 1
    # one copy of the instance would be 100 MiB; the node must not hold it in memory
    assert peak - baseline < 60, f"RSS grew from {baseline:.0f} to {peak:.0f} MiB"
