"""DICOM-SEG and TID 1500 SR: valid for dciodvfy, read back to the same label map on the source
geometry, measurements that match the truth, provenance in every object, deterministic UIDs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from scipy import ndimage

from segnode.imaging.volume import read_series
from segnode.config import default_models_dir
from segnode.models.registry import read_manifest
from segnode.outputs.overlay import build_overlays
from segnode.outputs.seg import Provenance, build_seg, labels_from_seg
from segnode.outputs.sr import build_sr, segment_stats
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom
from segnode.phantom.dx import DXOptions, generate_dx, write_dx
from tests.test_series import _enhanced

CT_MODEL = default_models_dir() / "ct-abdomen-phantom-3d"


# Debian's dicom3tools (2022) predates the Label Map Segmentation IOD (2024): it does not know the SOP class
UNKNOWN_TO_DCIODVFY_2022 = {"Error - Information Object Not found"}


def _dciodvfy_errors(ds, path: Path) -> list[str]:
    ds.save_as(path, enforce_file_format=True)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7":  # Label Map Segmentation Storage
        errors = [e for e in errors if e not in UNKNOWN_TO_DCIODVFY_2022]
    return errors


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct")
    phantom = generate_ct(5, CTOptions(matrix=48, slice_spacing=5.0, z_extent_mm=150.0, reversed_order=True,
                                       oblique_deg=10.0))
    files = write_phantom(phantom, folder / "ct")
    vol = read_series(files)
    sources = [dcmread(f, stop_before_pixels=True) for f in files]
    return phantom, files, vol, sources, phantom.labels[[f for f, _ in vol.order]]


def _prov(key: str = "job-1") -> Provenance:
    return Provenance(key, read_manifest(CT_MODEL))


@pytest.mark.parametrize("kind, compression", [("BINARY", "jpegls"), ("LABELMAP", "jpegls"), ("LABELMAP", "rle")])
def test_seg_is_valid_and_reads_back_to_the_label_map(ct, tmp_path, kind, compression):
    _, _, vol, sources, truth = ct
    seg = build_seg(truth, vol.order, sources, _prov(), kind, compression)
    assert _dciodvfy_errors(seg, tmp_path / "seg.dcm") == []
    back = dcmread(tmp_path / "seg.dcm")
    np.testing.assert_array_equal(labels_from_seg(back, sources, vol.order), truth)
    if kind == "BINARY":  # empty frames are left out
        assert int(back.NumberOfFrames) == sum(int((np.unique(s) > 0).sum()) for s in truth)
    else:  # background is the padding value only: OHIF takes the n-th segment item as segment n
        assert back.PixelPaddingValue == 0
        assert [int(s.SegmentNumber) for s in back.SegmentSequence] == [1, 2, 3, 4, 5]
        assert [s.SegmentLabel for s in back.SegmentSequence][0] == "liver"


def test_seg_carries_codes_colors_algorithm_and_provenance(ct):
    _, _, vol, sources, truth = ct
    prov = _prov()
    seg = hd.seg.Segmentation.from_dataset(build_seg(truth, vol.order, sources, prov))
    first = seg.SegmentSequence[0]
    assert first.SegmentLabel == "liver" and first.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert first.SegmentAlgorithmName == "ct-abdomen-phantom-3d" and first.SegmentAlgorithmType == "AUTOMATIC"
    assert first.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0].CodeMeaning == \
        "Artificial Intelligence"
    (equipment,) = [e for e in seg.ContributingEquipmentSequence if "weights sha256" in e.get("ContributionDescription", "")]
    assert equipment.Manufacturer == "segnode" and prov.manifest.weights_sha256[:40] in equipment.ContributionDescription
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Equipment"
    assert "ct-abdomen-phantom-3d 1.1.0" in equipment.SoftwareVersions
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    again = build_seg(truth, vol.order, sources, prov)
    assert again.SOPInstanceUID == seg.SOPInstanceUID and again.SeriesInstanceUID == seg.SeriesInstanceUID
    other = Provenance("job-1", prov.manifest.model_copy(update={"weights_sha256": "f" * 64}))
    assert build_seg(truth, vol.order, sources, other).DeviceUID != seg.DeviceUID
    assert build_seg(truth, vol.order, sources, _prov("job-2")).SOPInstanceUID != seg.SOPInstanceUID


def test_seg_of_an_enhanced_multiframe_series(ct, tmp_path):
    _, files, _, _, _ = ct
    path = tmp_path / "enhanced.dcm"
    _enhanced(files).save_as(path, enforce_file_format=True)
    vol = read_series([path])
    source = dcmread(path, stop_before_pixels=True)
    labels = (vol.array > 30).astype(np.uint8)  # any map: soft tissue and brighter is label 1
    seg = build_seg(labels, vol.order, [source], _prov())
    assert _dciodvfy_errors(seg, tmp_path / "seg.dcm") == []
    np.testing.assert_array_equal(labels_from_seg(dcmread(tmp_path / "seg.dcm"), [source], vol.order), labels)


@pytest.fixture(scope="module")
def radiograph(tmp_path_factory):
    dx = generate_dx(3, DXOptions(matrix=128))
    path = write_dx(dx, tmp_path_factory.mktemp("dx") / "dx")
    prov = Provenance("dx-job", read_manifest(default_models_dir() / "dx-chest-phantom-2d"))
    return dx, read_series([path]), dcmread(path, stop_before_pixels=True), prov


def test_seg_of_a_radiograph(radiograph, tmp_path):
    dx, vol, source, prov = radiograph
    seg = build_seg(dx.labels[None], vol.order, [source], prov)
    assert _dciodvfy_errors(seg, tmp_path / "seg.dcm") == []
    np.testing.assert_array_equal(labels_from_seg(dcmread(tmp_path / "seg.dcm"), [source], vol.order)[0], dx.labels)


def _seg_and_sr(vol, sources, truth, prov, tmp_path):
    """The SEG, the segment stats and the SR of the CT fixture's truth, the SR written to tmp_path/sr.dcm and
    checked by dciodvfy."""
    seg = build_seg(truth, vol.order, sources, prov)
    names = [label.name for label in prov.manifest.labels]
    stats = segment_stats(truth, vol.array, vol.affine, [1, 2, 3, 4, 5], names, hounsfield=True)
    sr = build_sr(seg, sources, vol.order, stats, prov)
    assert _dciodvfy_errors(sr, tmp_path / "sr.dcm") == []
    return seg, stats, sr


def test_sr_reports_volume_and_hu_per_segment_referencing_the_seg(ct, tmp_path):
    phantom, _, vol, sources, truth = ct
    prov = _prov()
    seg, stats, sr = _seg_and_sr(vol, sources, truth, prov, tmp_path)
    names = [label.name for label in prov.manifest.labels]
    liver = next(s for s in stats if s.name == "liver")
    voxel_ml = 5.0 * phantom.pixel_spacing[0] * phantom.pixel_spacing[1] / 1000
    assert liver.volume_ml == pytest.approx((truth == 1).sum() * voxel_ml, rel=1e-6)
    assert 40 < liver.mean < 90  # the phantom's liver is 50-70 HU plus texture and noise
    parsed = hd.sr.srread(tmp_path / "sr.dcm")
    groups = parsed.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(stats)
    group = next(g for g in groups if g.tracking_identifier == "liver")
    assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert group.referenced_segment.referenced_segment_numbers == [1]
    volume = next(m for m in group.get_measurements() if m.name.meaning == "Volume")
    assert volume.value == pytest.approx(liver.volume_ml, rel=1e-3) and volume.unit.value == "ml"
    assert {m.derivation.meaning for m in group.get_measurements() if m.derivation} == {"Mean", "Standard Deviation"}


def _filled(outline: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres lie inside a SCOORD polyline ((column, row), pixel centres at +0.5)."""
    from matplotlib.path import Path as Polygon

    rows, cols = np.mgrid[:shape[0], :shape[1]]
    centres = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=1)
    return Polygon(outline).contains_points(centres).reshape(shape)


def test_a_ragged_outline_is_simplified_until_its_graphic_data_fits():
    """Graphic Data holds at most 8191 points in explicit VR; a longer outline was written as UN, unreadable."""
    from segnode.outputs.sr import MAX_OUTLINE_POINTS, largest_section

    mask = np.zeros((1, 256, 256), bool)  # a brush: one 4-connected part whose edge has ~17,000 corners
    mask[0, ::4, :] = mask[0, 1::4, ::2] = mask[0, 2::4, ::2] = mask[0, :, 0] = True
    section, outline = largest_section(mask)
    assert section == 0 and 100 < len(outline) <= MAX_OUTLINE_POINTS
    np.testing.assert_array_equal(outline[0], outline[-1])


def test_sr_outlines_each_segment_on_its_largest_section_for_viewers_that_draw_regions(ct, tmp_path):
    """OHIF lists and draws a measurement only when its group holds a SCOORD: each segment also gets a planar
    group, with the same tracking UID, outlining it on the source image where it is largest (reversed, oblique
    series: the reference must be that slice's own instance)."""
    _, _, vol, sources, truth = ct
    prov = _prov()
    seg, stats, sr = _seg_and_sr(vol, sources, truth, prov, tmp_path)
    names = [label.name for label in prov.manifest.labels]
    parsed = hd.sr.srread(tmp_path / "sr.dcm")
    volumetric = {g.tracking_uid: g for g in parsed.content.get_volumetric_roi_measurement_groups()}
    outlines = parsed.content.get_planar_roi_measurement_groups()
    assert len(outlines) == len(volumetric) == len(stats)
    by_uid = {str(s.SOPInstanceUID): i for i, s in enumerate(sources)}
    for group in outlines:
        value = names.index(group.tracking_identifier) + 1
        assert group.tracking_uid in volumetric  # OHIF merges both groups by it: the volume is listed too
        region = group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        points = region.value
        np.testing.assert_array_equal(points[0], points[-1])  # closed
        referenced = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID  # SELECTED FROM
        section = next(i for i, (file, _) in enumerate(vol.order) if file == by_uid[referenced])
        areas = [(truth[i] == value).sum() for i in range(len(truth))]
        assert areas[section] == max(areas), group.tracking_identifier
        parts, _ = ndimage.label(truth[section] == value)  # the largest part: one outline per group
        truth_slice = parts == np.argmax(np.bincount(parts.ravel())[1:]) + 1
        drawn = _filled(points, truth.shape[1:])
        assert (drawn & truth_slice).sum() * 2 / (drawn.sum() + truth_slice.sum()) > 0.95, group.tracking_identifier
        assert group.get_measurements() == []  # the segment's are in its segment group, same tracking UID


def test_a_result_that_replaces_an_earlier_one_says_so_and_names_its_predecessor(ct, tmp_path):
    """A late instance re-ran the series: the PACS then holds two results; the new ones must say which is current."""
    _, _, vol, sources, truth = ct
    names = [label.name for label in _prov().manifest.labels]
    stats = segment_stats(truth, vol.array, vol.affine, [1, 2, 3, 4, 5], names, hounsfield=True)
    old_seg = build_seg(truth, vol.order, sources, _prov("job-1"))
    old_sr = build_sr(old_seg, sources, vol.order, stats, _prov("job-1"))
    prov = Provenance("job-2", read_manifest(CT_MODEL), previous_sr=old_sr)
    seg = build_seg(truth, vol.order, sources, prov)
    sr = build_sr(seg, sources, vol.order, stats, prov)
    assert "revised" in seg.SeriesDescription and "revised" in sr.SeriesDescription
    assert "revised" not in old_seg.SeriesDescription and "revised" not in old_sr.SeriesDescription
    (study,) = sr.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == old_sr.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old_sr.SOPInstanceUID
    assert _dciodvfy_errors(sr, tmp_path / "sr.dcm") == []


def _colored(rgb: np.ndarray, color) -> np.ndarray:
    return (rgb == np.asarray(color, dtype=np.uint8)).all(axis=-1)


def test_contour_images_outline_each_label_in_its_colour_over_the_ct(ct, tmp_path):
    _, _, vol, sources, truth = ct
    prov = _prov()
    truth = truth.copy()
    truth[0] = 0  # a slice without labels gets no picture
    scs = build_overlays(truth, vol.array, vol.order, sources, prov, "CT")
    assert len(scs) == int((truth.reshape(len(truth), -1).max(axis=1) > 0).sum()) == len(truth) - 1
    assert _dciodvfy_errors(scs[0], tmp_path / "sc.dcm") == []
    middle = len(truth) // 2
    sc = scs[middle - 1]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == sources[vol.order[middle][0]].SOPInstanceUID
    assert sc.StudyInstanceUID == sources[0].StudyInstanceUID and sc.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert sc.PhotometricInterpretation == "RGB" and "not for diagnosis" in sc.SeriesDescription
    rgb, liver = sc.pixel_array, truth[middle] == 1
    color = next(label.color for label in prov.manifest.labels if label.name == "liver")
    outline = _colored(rgb, color)
    assert outline.any() and not (outline & ~liver).any()  # on the liver's edge, never outside it
    assert (outline & liver).sum() < liver.sum() / 2  # an outline, not a fill
    grey = ~(rgb[..., 0] == rgb[..., 1]) | ~(rgb[..., 1] == rgb[..., 2])
    assert not (grey & (truth[middle] == 0)).any()  # the image itself stays grey where there is no label
    assert [s.SOPInstanceUID for s in build_overlays(truth, vol.array, vol.order, sources, prov, "CT")] == \
        [s.SOPInstanceUID for s in scs]  # derived from the job: a re-push is no duplicate
    # the series is stored reversed and oblique: contour image N shows what CT image N shows, where it shows it
    for overlay in scs:
        source = next(s for s in sources if s.SOPInstanceUID == overlay.SourceImageSequence[0].ReferencedSOPInstanceUID)
        assert overlay.InstanceNumber == source.InstanceNumber
        assert overlay.ImagePositionPatient == source.ImagePositionPatient
        assert overlay.FrameOfReferenceUID == source.FrameOfReferenceUID


def test_contour_image_of_a_radiograph(radiograph, tmp_path):
    dx, vol, source, prov = radiograph
    (sc,) = build_overlays(dx.labels[None], vol.array, vol.order, [source], prov, "DX")
    assert _dciodvfy_errors(sc, tmp_path / "sc.dcm") == []
    assert list(sc.PatientOrientation) == [str(v)[:1] for v in source.PatientOrientation]
    for label in prov.manifest.labels:
        if (dx.labels == label.value).any():
            assert _colored(sc.pixel_array, label.color).any(), label.name


def test_sr_of_a_radiograph_reports_areas_on_its_plane_never_volumes(radiograph, tmp_path):
    dx, vol, source, prov = radiograph
    assert vol.projection
    labels = dx.labels[None]
    seg = build_seg(labels, vol.order, [source], prov)
    names = [label.name for label in prov.manifest.labels]
    values = [label.value for label in prov.manifest.labels]
    stats = segment_stats(labels, vol.array, vol.affine, values, names, hounsfield=False, planar=True)
    assert all(s.volume_ml is None and s.mean is None for s in stats)
    sr = build_sr(seg, [source], vol.order, stats, prov)
    assert _dciodvfy_errors(sr, tmp_path / "sr.dcm") == []
    parsed = hd.sr.srread(tmp_path / "sr.dcm")
    assert parsed.content.get_volumetric_roi_measurement_groups() == []
    groups = [g for g in parsed.content.get_planar_roi_measurement_groups() if g.referenced_segmentation_frame]
    assert len(groups) == len(stats) == len(names)
    pixel_cm2 = float(dx.dataset.PixelSpacing[0]) * float(dx.dataset.PixelSpacing[1]) / 100
    for value, name in zip(values, names):
        group = next(g for g in groups if g.tracking_identifier == name)
        (area,) = group.get_measurements()
        assert area.name.meaning == "Area" and area.unit.value == "cm2"
        assert area.value == pytest.approx((dx.labels == value).sum() * pixel_cm2, rel=1e-3)
        frame = group.referenced_segmentation_frame  # the SEG's own frame of this segment (BINARY)
        assert frame is not None and frame.referenced_sop_instance_uid == seg.SOPInstanceUID
        (item,) = seg.PerFrameFunctionalGroupsSequence[frame.referenced_frame_numbers[0] - 1].SegmentIdentificationSequence
        assert item.ReferencedSegmentNumber == value


def test_the_dx_model_measures_areas_within_two_percent_of_the_phantom_truth(radiograph, tmp_path):
    from segnode.inference.engine import EngineOptions, engine_for

    dx, vol, _, prov = radiograph
    labels = engine_for(default_models_dir() / "dx-chest-phantom-2d", EngineOptions(device="cpu")).segment(vol).labels
    values = [label.value for label in prov.manifest.labels]
    names = [label.name for label in prov.manifest.labels]
    got = {s.name: s.area_cm2 for s in segment_stats(labels, vol.array, vol.affine, values, names, False, True)}
    truth = {s.name: s.area_cm2 for s in segment_stats(dx.labels[None], vol.array, vol.affine, values, names, False,
                                                       True)}
    for name in names:
        assert got[name] == pytest.approx(truth[name], rel=0.02), name
