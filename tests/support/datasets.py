"""Synthetic, valid DICOM test data (pydicom 3, Explicit VR Little Endian).

This module must not import ``gateway``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from gateway.dicom.scu import OutgoingFile

__all__ = [
    "DEFAULT_PATIENT_ID",
    "DEFAULT_PATIENT_NAME",
    "build_instance",
    "make_ct_study",
    "make_instance",
    "outgoing_ct_files",
    "pixel_bytes",
    "sha256_pixel",
    "sop_instance_uids",
]

DEFAULT_PATIENT_ID = "GW-TEST-0001"
DEFAULT_PATIENT_NAME = "Test^Patient"


def _pixels(rows: int, cols: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16)
    return arr.astype("<u2").tobytes()


def build_instance(
    *,
    sop_class_uid: str = CTImageStorage,
    modality: str = "CT",
    patient_id: str = DEFAULT_PATIENT_ID,
    patient_name: str = DEFAULT_PATIENT_NAME,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    series_number: int = 1,
    rows: int = 64,
    cols: int = 64,
    seed: int = 0,
    study_date: str = "20240115",
    study_time: str = "101500",
    accession_number: str = "ACC0001",
    slice_thickness: float = 2.5,
    **elements: Any,
) -> Dataset:
    """Return a complete single-frame image dataset (with ``file_meta``).

    Extra ``elements`` are DICOM keywords (``InstitutionName="X"``); a value of
    ``None`` deletes the element (to build deliberately incomplete objects).
    """
    sop_uid = UID(sop_instance_uid or generate_uid())
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta

    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = study_date
    ds.InstanceCreationTime = study_time
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study_date
    ds.StudyTime = study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = accession_number
    ds.StudyDescription = "Gateway test study"
    # General Series
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = study_date
    ds.SeriesTime = study_time
    ds.SeriesDescription = f"Synthetic {modality}"
    ds.PatientPosition = "HFS"
    # Frame of Reference / Equipment
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "for"])
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "dicom-gateway tests"
    # General Image / Image Plane
    ds.InstanceNumber = instance_number
    ds.ContentDate = study_date
    ds.ContentTime = study_time
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [-80.0, -80.0, round(instance_number * slice_thickness, 3)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = slice_thickness
    ds.SliceLocation = round(instance_number * slice_thickness, 3)
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if sop_class_uid == CTImageStorage:
        # CT Image module
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 400
    ds.PixelData = _pixels(rows, cols, seed)

    for keyword, value in elements.items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"not a DICOM keyword: {keyword!r}")
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def _target(out: Path, ds: Dataset) -> Path:
    out = Path(out)
    if out.suffix.lower() == ".dcm":
        out.parent.mkdir(parents=True, exist_ok=True)
        return out
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{ds.SOPInstanceUID}.dcm"


def make_instance(out: Path, **kwargs: Any) -> Path:
    """Write one instance; ``out`` is a ``.dcm`` file path or a directory.

    Keyword arguments are those of :func:`build_instance` (e.g. ``sop_class_uid``,
    ``modality``, ``patient_id``, or any DICOM keyword as an extra element).
    """
    ds = build_instance(**kwargs)
    path = _target(out, ds)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_ct_study(
    out_dir: Path,
    n: int,
    *,
    rows: int = 64,
    cols: int = 64,
    patient_id: str = DEFAULT_PATIENT_ID,
    patient_name: str = DEFAULT_PATIENT_NAME,
    study_uid: str | None = None,
    series_uid: str | None = None,
    seed: int = 0,
    **elements: Any,
) -> list[Path]:
    """Write ``n`` CT Image Storage files of one study/series; return their paths
    in instance-number order (``CT0001.dcm`` ...)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    paths: list[Path] = []
    for i in range(1, n + 1):
        ds = build_instance(
            patient_id=patient_id,
            patient_name=patient_name,
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=i,
            rows=rows,
            cols=cols,
            seed=seed * 100_003 + i,
            **elements,
        )
        path = out_dir / f"CT{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def pixel_bytes(source: Path | bytes | Dataset) -> bytes:
    """Raw PixelData bytes of a file path, an in-memory Part 10 file, or a dataset."""
    if isinstance(source, Dataset):
        ds = source
    elif isinstance(source, bytes):
        ds = pydicom.dcmread(BytesIO(source))
    else:
        ds = pydicom.dcmread(source)
    data: bytes = ds.PixelData
    return data


def sha256_pixel(path: Path | bytes | Dataset) -> str:
    """Hex SHA-256 of the PixelData element value."""
    return hashlib.sha256(pixel_bytes(path)).hexdigest()


def sop_instance_uids(paths: Sequence[Path]) -> list[str]:
    """Sorted SOPInstanceUIDs of the given files."""
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths)


def outgoing_ct_files(folder: Path, n: int, seed: int, **elements: Any) -> list[OutgoingFile]:
    """A CT study made by :func:`make_ct_study` in ``folder``, as the StoreSCU sends files."""
    out = []
    for p in make_ct_study(folder, n, seed=seed, **elements):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out.append(
            OutgoingFile(
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID),
                str(ds.file_meta.TransferSyntaxUID),
                p,
            )
        )
    return out
