"""The test helpers themselves work against the real external programs."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage

from tests.support.datasets import (
    build_instance,
    make_ct_study,
    make_instance,
    pixel_bytes,
    sha256_pixel,
    sop_instance_uids,
)
from tests.support.peers import Orthanc, StoreSCP, dcmtk, dcmtk_path, free_port


def test_generated_study_is_valid(tmp_path: Path) -> None:
    paths = make_ct_study(tmp_path, 3, rows=32, cols=48, patient_id="P1")
    assert [p.name for p in paths] == ["CT0001.dcm", "CT0002.dcm", "CT0003.dcm"]
    datasets = [pydicom.dcmread(p) for p in paths]
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 3
    for i, ds in enumerate(datasets, start=1):
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == CTImageStorage
        assert ds.InstanceNumber == i
        assert ds.PatientID == "P1"
        assert ds.pixel_array.shape == (32, 48)
        assert len(ds.PixelData) == 32 * 48 * 2
    # deterministic per seed, different per instance
    again = make_ct_study(tmp_path / "again", 3, rows=32, cols=48)
    assert [sha256_pixel(p) for p in paths] == [sha256_pixel(p) for p in again]
    assert len({sha256_pixel(p) for p in paths}) == 3
    # DCMTK agrees the files are well-formed
    proc = dcmtk("dcmftest", *paths)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_make_instance_overrides(tmp_path: Path) -> None:
    path = make_instance(
        tmp_path,
        sop_class_uid=SecondaryCaptureImageStorage,
        modality="OT",
        InstitutionName="Gateway Hospital",
        AccessionNumber=None,
    )
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert ds.file_meta.MediaStorageSOPClassUID == SecondaryCaptureImageStorage
    assert ds.Modality == "OT"
    assert ds.InstitutionName == "Gateway Hospital"
    assert "AccessionNumber" not in ds
    assert "KVP" not in ds
    assert pixel_bytes(build_instance(seed=7)) == pixel_bytes(build_instance(seed=7))


def test_dcmtk_resolves_real_binaries() -> None:
    # .venv/bin has pynetdicom's python "storescu"; we must get DCMTK's ELF.
    for tool in ("storescu", "echoscu", "storescp"):
        with open(dcmtk_path(tool), "rb") as f:
            assert f.read(4) == b"\x7fELF"


def test_orthanc_starts_and_echo(orthanc: Orthanc) -> None:
    system = orthanc.get("/system")
    assert system["DicomAet"] == "ORTHANC"
    assert system["DicomPort"] == orthanc.dicom_port
    assert orthanc.count_instances() == 0
    proc = dcmtk(
        "echoscu", "-aet", "GATEWAY", "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_storescu_to_orthanc_preserves_pixels(orthanc: Orthanc, ct_study_small: list[Path]) -> None:
    proc = dcmtk(
        "storescu",
        "-aet",
        "GATEWAY",
        "-aec",
        "ORTHANC",
        "127.0.0.1",
        str(orthanc.dicom_port),
        *ct_study_small,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert orthanc.wait_for_instances(5, timeout=30) == 5
    assert orthanc.sop_instance_uids() == sop_instance_uids(ct_study_small)

    sent = {str(pydicom.dcmread(p).SOPInstanceUID): pixel_bytes(p) for p in ct_study_small}
    for instance_id in orthanc.instances():
        tags = orthanc.instance_tags(instance_id)
        assert tags["PatientID"] == "GW-TEST-0001"
        assert tags["Modality"] == "CT"
        stored = pydicom.dcmread(BytesIO(orthanc.instance_file(instance_id)))
        assert stored.PixelData == sent[str(stored.SOPInstanceUID)]
        assert orthanc.instance_id_for_uid(str(stored.SOPInstanceUID)) == instance_id


def test_orthanc_restart_keeps_data(tmp_path: Path) -> None:
    paths = make_ct_study(tmp_path / "study", 2)
    with Orthanc(tmp_path, aet="RESTART") as server:
        port = server.dicom_port
        dcmtk("storescu", "-aec", "RESTART", "127.0.0.1", str(port), *paths, check=True)
        server.wait_for_instances(2)
        server.stop()
        assert not server.running
        proc = dcmtk("echoscu", "-aec", "RESTART", "127.0.0.1", str(port), timeout=30)
        assert proc.returncode != 0  # really down
        server.start()
        assert server.dicom_port == port
        assert server.count_instances() == 2
        assert server.sop_instance_uids() == sop_instance_uids(paths)
    assert not server.running


def test_storescp_receives(tmp_path: Path, ct_study_small: list[Path]) -> None:
    with StoreSCP(tmp_path / "received", aet="SCP") as scp:
        dcmtk("storescu", "-aec", "SCP", "127.0.0.1", str(scp.port), *ct_study_small, check=True)
        files = scp.wait_for_files(5)
        assert sorted(sha256_pixel(f) for f in files) == sorted(
            sha256_pixel(p) for p in ct_study_small
        )
    assert not scp.running


def test_orthanc_pushes_to_storescp(tmp_path: Path, ct_study_small: list[Path]) -> None:
    port = free_port()
    with (
        StoreSCP(tmp_path / "pushed", aet="DEST", port=port) as scp,
        Orthanc(tmp_path, modalities={"DEST": ("DEST", "127.0.0.1", port)}) as server,
    ):
        dcmtk(
            "storescu",
            "-aec",
            "ORTHANC",
            "127.0.0.1",
            str(server.dicom_port),
            *ct_study_small,
            check=True,
        )
        server.wait_for_instances(5)
        assert server.echo_modality("DEST")
        server.store_to_modality("DEST", server.instances())
        assert len(scp.wait_for_files(5)) == 5


def test_postgres_reachable(pg_url: str) -> None:
    # Unix-socket URLs work from inside the `unshare -n` namespace.
    import sqlalchemy

    engine = sqlalchemy.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("select 1")).scalar_one() == 1
    finally:
        engine.dispose()
