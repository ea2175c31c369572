"""DICOM networking and encoding. Importing it turns pynetdicom's identifier logging off (PHI)."""

from pynetdicom import _config as _pynetdicom_config

_pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
_pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
