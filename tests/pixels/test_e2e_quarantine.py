"""End to end: storescu -> node (route with profile basic-pixels) -> Orthanc. An ultrasound image
from a device no rule knows quarantines the delivery; nothing reaches Orthanc."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.uid import UltrasoundImageStorage, generate_uid

from tests.e2e.test_forward import orthanc_destination, storescu
from tests.pixels.test_refusals import NAME, cine
from tests.support.node import GatewayNode
from tests.support.peers import Orthanc


def _study(folder: Path) -> list[Path]:
    folder.mkdir()
    study = generate_uid()
    files = []
    for i, manufacturer in enumerate(("Philips Medical Systems", "Nobody Ultrasound")):
        ds = pydicom.dcmread(BytesIO(cine(1, text_on=None)))
        del ds.NumberOfFrames
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
        ds.StudyInstanceUID = study
        ds.InstanceNumber = i + 1
        ds.Manufacturer = manufacturer
        ds.ManufacturerModelName = "EPIQ 7C" if i == 0 else "Mystery 3000"
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def test_unknown_ultrasound_device_is_quarantined_and_never_sent(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    files = _study(tmp_path / "study")
    node = GatewayNode(
        tmp_path / "node",
        destinations=[orthanc_destination(orthanc)],
        routes=[
            {
                "name": "research",
                "destinations": ["pacs"],
                "quiet_seconds": 0.5,
                "profile": "basic-pixels",
            }
        ],
    )
    with node:
        storescu(node, files)
        (held,) = node.wait_for_deliveries("quarantined", 1, timeout=120)
        assert orthanc.count_instances() == 0
    reason = held["last_error"]
    assert "no pixel rule matches" in reason
    assert "Nobody Ultrasound" in reason and "Mystery 3000" in reason and "Rows='480'" in reason
    assert NAME.split("^")[0] not in reason
    assert NAME.split("^")[0] not in node.log_path.read_text()
