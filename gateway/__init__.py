"""dicom-gateway: a DICOM/PACS gateway node."""

__version__ = "0.1.0"
