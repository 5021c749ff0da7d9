from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from gateway.deid import ProjectKey, load_profile

REPO = Path(__file__).resolve().parents[2]
PROFILES = REPO / "deid_profiles"


@pytest.fixture(scope="session")
def key() -> ProjectKey:
    return ProjectKey(b"test-secret-" + b"0123456789" * 3)


@pytest.fixture(scope="session")
def basic():
    return load_profile("basic", PROFILES)


@pytest.fixture(scope="session")
def research():
    return load_profile("research", PROFILES)


def base_dataset() -> Dataset:
    """A small CT-like instance with the usual identifying attributes."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.2.1125.1.111111"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.2.1125.1.222222"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1125.1.333333"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.2.1125.1.444444"
    ds.Modality = "CT"
    ds.PatientName = "Quixote^Alonso^Q"
    ds.PatientID = "MRN7781234"
    ds.PatientBirthDate = "19470315"
    ds.PatientSex = "M"
    ds.PatientAge = "077Y"
    ds.StudyDate = "20240131"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC99817"
    ds.StudyID = "STU4411"
    ds.StudyDescription = "Thorax Quixote follow-up"
    ds.SeriesDescription = "Lung kernel"
    ds.InstitutionName = "Mancha General Hospital"
    ds.StationName = "CTROOM17"
    ds.Manufacturer = "ACME"
    ds.ReferringPhysicianName = "Panza^Sancho"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x00\x01" * 4
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.SourceApplicationEntityTitle = "MODALITYAE77"
    return ds
