"""TID 1500 Measurement Report (Comprehensive 3D SR): per segment its volume and, for CT, the mean
and standard deviation of HU, each group referencing its SEG segment, with the device observer and
algorithm identification IHE AI Results expects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes

from segnode.dicom.uids import derived_uid
from segnode.outputs.seg import MANUFACTURER, SERIES_NUMBER_SR, Provenance, _coded

MILLILITER = Code("ml", "UCUM", "milliliter")
HOUNSFIELD = Code("[hnsf'U]", "UCUM", "Hounsfield unit")


@dataclass
class SegmentStats:
    value: int
    name: str
    voxels: int
    volume_ml: float
    mean: float | None = None  # HU, CT only
    std: float | None = None


def segment_stats(labels: np.ndarray, image: np.ndarray, affine: np.ndarray, values: Sequence[int],
                  names: Sequence[str], hounsfield: bool) -> list[SegmentStats]:
    """Volume from the voxel count and the affine's voxel volume (exact for sheared stacks too)."""
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    out = []
    for value, name in zip(values, names):
        mask = labels == value
        n = int(mask.sum())
        if n == 0:
            continue
        stats = SegmentStats(value, name, n, n * voxel_ml)
        if hounsfield:
            inside = image[mask]
            stats.mean, stats.std = float(inside.mean()), float(inside.std())
        out.append(stats)
    return out


def build_sr(seg: Dataset, sources: Sequence[Dataset], stats: Sequence[SegmentStats], prov: Provenance) -> Dataset:
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=prov.device_uid, name=prov.manifest.name[:64], manufacturer_name=MANUFACTURER,
            model_name=prov.manifest.name[:64], serial_number=prov.manifest.weights_sha256[:16]))
    algorithm = hd.sr.AlgorithmIdentification(name=prov.manifest.name, version=prov.manifest.version,
                                              family=codes.cid7162.ArtificialIntelligence, manufacturer=MANUFACTURER)
    labels = {label.value: label for label in prov.manifest.labels}
    groups = []
    for s in stats:
        label = labels[s.value]
        measurements = [hd.sr.Measurement(name=codes.SCT.Volume, value=round(s.volume_ml, 3), unit=MILLILITER,
                                          algorithm_id=algorithm)]
        if s.mean is not None and s.std is not None:
            measurements += [
                hd.sr.Measurement(name=codes.DCM.AttenuationCoefficient, value=round(s.mean, 2), unit=HOUNSFIELD,
                                  derivation=codes.SCT.Mean, algorithm_id=algorithm),
                hd.sr.Measurement(name=codes.DCM.AttenuationCoefficient, value=round(s.std, 2), unit=HOUNSFIELD,
                                  derivation=codes.SCT.StandardDeviation, algorithm_id=algorithm)]
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid(prov.job_key, "roi", str(s.value)),
                                                         identifier=s.name),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=s.value,
                source_series=hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID)),
            finding_type=_coded(label.type), finding_category=_coded(label.category), algorithm_id=algorithm,
            measurements=measurements))
    modality = str(getattr(sources[0], "Modality", ""))
    procedure = codes.SCT.ComputedTomography if modality == "CT" else codes.SCT.ImagingProcedure
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                                     procedure_reported=procedure, imaging_measurements=groups,
                                     title=codes.cid7021.ImagingMeasurementReport)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *sources], content=report[0], series_instance_uid=derived_uid(prov.job_key, "sr-series"),
        series_number=SERIES_NUMBER_SR, sop_instance_uid=derived_uid(prov.job_key, "sr"), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, contributing_equipment=[prov.equipment()])
    sr.SeriesDescription = f"Measurements {prov.model_label}"[:64]
    return sr
