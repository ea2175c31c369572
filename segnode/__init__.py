"""segnode: a PACS-integrated DICOM node that segments what it receives."""

__version__ = "0.1.0"
