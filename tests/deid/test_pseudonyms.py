"""Keyed pseudonyms: identical across runs and nodes with the same secret; references resolve."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from gateway.deid import ProjectKey, deidentify, generate_secret_file
from gateway.deid.engine import Engine

from .conftest import base_dataset


def _seg_like(ct: Dataset) -> Dataset:
    seg = base_dataset()
    seg.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    seg.SOPInstanceUID = "1.2.826.0.1.3680043.2.1125.9.1"
    seg.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1125.9.2"
    ref = Dataset()
    ref.ReferencedSOPClassUID = ct.SOPClassUID
    ref.ReferencedSOPInstanceUID = ct.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = ct.SeriesInstanceUID
    series.ReferencedInstanceSequence = Sequence([ref])
    seg.ReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = ct.FrameOfReferenceUID
    study = Dataset()
    study.ReferencedSOPInstanceUID = ct.StudyInstanceUID
    frame.RTReferencedStudySequence = Sequence([study])
    seg.ReferencedFrameOfReferenceSequence = Sequence([frame])
    return seg


def test_same_secret_same_pseudonyms_across_nodes(tmp_path: Path, basic) -> None:
    secret = generate_secret_file(tmp_path / "project.secret")
    node_a = Engine(basic, ProjectKey.from_file(secret))
    node_b = Engine(basic, ProjectKey.from_file(secret))
    out_a, rep_a = node_a.deidentify(base_dataset())
    out_b, rep_b = node_b.deidentify(base_dataset())
    for kw in (
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "PatientID",
        "PatientName",
        "FrameOfReferenceUID",
    ):
        assert out_a[kw].value == out_b[kw].value, kw
    assert rep_a.key_id == rep_b.key_id
    assert out_a.to_json_dict() == out_b.to_json_dict()
    other = Engine(basic, ProjectKey(b"another-secret-" * 3))
    assert other.deidentify(base_dataset())[0].SOPInstanceUID != out_a.SOPInstanceUID


def test_references_resolve_after_deidentification(key, basic, research) -> None:
    ct = base_dataset()
    seg = _seg_like(ct)
    for profile in (basic, research):
        ct_out, _ = deidentify(ct, profile, key)
        seg_out, _ = deidentify(seg, profile, key)
        series = seg_out.ReferencedSeriesSequence[0]
        assert series.SeriesInstanceUID == ct_out.SeriesInstanceUID
        ref = series.ReferencedInstanceSequence[0]
        assert ref.ReferencedSOPInstanceUID == ct_out.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == ct.SOPClassUID
        frame = seg_out.ReferencedFrameOfReferenceSequence[0]
        assert frame.FrameOfReferenceUID == ct_out.FrameOfReferenceUID
        study = frame.RTReferencedStudySequence[0]
        assert study.ReferencedSOPInstanceUID == ct_out.StudyInstanceUID
        assert seg_out.PatientID == ct_out.PatientID  # same patient, same pseudonym


def test_secret_is_never_shown(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_bytes(b"S" * 40 + b"\n")
    key = ProjectKey.from_file(path)
    assert "SSSS" not in repr(key) and "SSSS" not in str(key)
    assert len(key.key_id) == 16
