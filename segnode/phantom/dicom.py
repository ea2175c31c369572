"""DICOM modules every phantom shares: patient, study, series, equipment, SOP common."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from segnode.dicom.uids import UID_ROOT

STUDY_DATE = "20260101"


def deterministic_uid(rng: np.random.Generator) -> str:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[str(rng.integers(0, 2**63))])


def base_dataset(sop_class_uid: str, sop_instance_uid: str, modality: str, *, study_uid: str, series_uid: str,
                 patient_name: str, patient_id: str, series_number: int, instance_number: int,
                 series_description: str) -> Dataset:
    """A dataset with the patient, study, series, equipment and SOP common modules filled in."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, sop_instance_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "19700101", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "120000"
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "PHANTOM", "1", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, series_number, instance_number
    ds.SeriesDescription = series_description
    ds.Manufacturer, ds.ManufacturerModelName = "segnode", "synthetic phantom"
    ds.DeviceSerialNumber, ds.SoftwareVersions = "0", "segnode phantom 1"
    ds.InstitutionName = "segnode synthetic data"
    ds.BurnedInAnnotation = "NO"
    return ds


def set_pixels(ds: Dataset, pixels: np.ndarray, bits_stored: int) -> None:
    """Unsigned grayscale pixel data (MONOCHROME2)."""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
