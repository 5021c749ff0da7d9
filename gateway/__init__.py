"""dicom-gateway: a DICOM/PACS gateway node."""

from pydicom import config as _pydicom_config

__version__ = "0.1.0"

# pydicom validates every value it converts or is given and, in its default "warn" mode, quotes
# the value it finds invalid in a warning ("Invalid value for VR DA: '1947-03-15'"), which would
# carry patient data to the node's log. The node is no validator (warn mode never refused
# anything), so values are read and written without that check. gateway.logging also redacts
# quoted values from whatever pydicom and pynetdicom still log or warn.
_pydicom_config.settings.reading_validation_mode = _pydicom_config.IGNORE
_pydicom_config.settings.writing_validation_mode = _pydicom_config.IGNORE
