"""DICOM encoding without networking: the streaming dataset walker, PS3.10 file meta, DIMSE command
sets, statuses and UIDs. Importing it changes nothing in other libraries."""
