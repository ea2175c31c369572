"""Results in the forms a PACS takes: DICOM-SEG, TID 1500 SR, contour images, and their file names."""
