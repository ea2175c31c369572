"""The radiologist's viewer in the loop: every kind of result, as the PACS holds it, opened in OHIF 3.13 (served
by the demo's nginx, reading Orthanc over DICOMweb) in Debian's chromium. Asserted as a radiologist would see
it: no error, the model's segments with their colours, the overlay drawn where the SEG file puts it (canvas
pixels mapped to patient coordinates with OHIF's own camera, compared with the SEG decoded by highdicom), and
the SR's measurements listed."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import httpx
import numpy as np
import pytest
from pydicom import Dataset, dcmread

from ohif import CHROMIUM, CHROMIUM_ARGS, OHIFPage
from peers import orthanc
from segnode.config import default_models_dir
from segnode.demo.viewer import ohif
from segnode.imaging.volume import read_series
from segnode.models.manifest import Manifest
from segnode.models.registry import read_manifest
from segnode.outputs.seg import Provenance, SegType, build_seg
from segnode.outputs.sr import build_sr, segment_stats
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom
from segnode.phantom.dx import DXOptions, generate_dx, write_dx

pytestmark = pytest.mark.browser
CT_MODEL, DX_MODEL = default_models_dir() / "ct-abdomen-phantom-3d", default_models_dir() / "dx-chest-phantom-2d"


@pytest.fixture(scope="module")
def viewer(tmp_path_factory):
    """Orthanc with DICOMweb, OHIF in front of it, and a browser."""
    playwright = pytest.importorskip("playwright.sync_api")
    work = tmp_path_factory.mktemp("viewer")
    with orthanc(work / "orthanc") as pacs, ohif(work / "ohif", f"{pacs.url}/dicom-web/") as served, \
            playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield pacs, served, browser
        finally:
            browser.close()


@dataclass
class Study:
    uid: str
    sources: list[Dataset]
    order: list[tuple[int, int]]
    seg: Dataset
    sr: Dataset
    manifest: Manifest


def _store(pacs, datasets) -> None:
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        httpx.post(f"{pacs.url}/instances", content=buffer.getvalue(), timeout=60).raise_for_status()


def _result(files: list[Path], labels_in_files: np.ndarray, model: Path, key: str, kind: SegType = "BINARY",
            previous: Dataset | None = None) -> tuple[list[Dataset], list[tuple[int, int]], Dataset, Dataset, Manifest]:
    """SEG and SR for a phantom's truth, as segnode writes them for a job (`key`)."""
    vol = read_series(files)
    sources = [dcmread(f, stop_before_pixels=True) for f in files]
    labels = labels_in_files[[f for f, _ in vol.order]]
    prov = Provenance(key, read_manifest(model), previous_sr=previous)
    seg = build_seg(labels, vol.order, sources, prov, kind)
    stats = segment_stats(labels, vol.array, vol.affine, [lb.value for lb in prov.manifest.labels],
                          [lb.name for lb in prov.manifest.labels], hounsfield=not vol.projection,
                          planar=vol.projection)
    return sources, list(vol.order), seg, build_sr(seg, sources, vol.order, stats, prov), prov.manifest


def _ct_study(pacs, folder: Path, seed: int, options: CTOptions, kind: SegType = "BINARY") -> Study:
    phantom = generate_ct(seed, options)
    files = write_phantom(phantom, folder)
    sources, order, seg, sr, manifest = _result(files, phantom.labels, CT_MODEL, f"viewer-{seed}", kind)
    _store(pacs, [dcmread(f) for f in files] + [seg, sr])
    return Study(str(sources[0].StudyInstanceUID), sources, order, seg, sr, manifest)


def _overlay_dice(page: OHIFPage, study: Study, slices: int = 3) -> list[float]:
    """Per sampled image: Dice of each segment as drawn (canvas pixels that change when only that segment is
    shown) against the SEG decoded by highdicom at the patient coordinates of those canvas pixels."""
    seg = hd.seg.Segmentation.from_dataset(study.seg)
    values = [label.value for label in study.manifest.labels]
    by_uid = {str(s.SOPInstanceUID): s for s in study.sources}
    count = page.show_image(0)["count"]
    truth = {uid: seg.get_pixels_by_source_instance([uid], combine_segments=True,
                                                    assert_missing_frames_are_empty=True)[0]
             for uid in by_uid}
    # the images where the segments cover most, and two more spread between
    ordered = [page.show_image(i)["sop"] for i in range(count)]
    area = [int((truth[uid] > 0).sum()) for uid in ordered]
    picks = sorted({int(np.argmax(area)), *[int(i) for i in np.flatnonzero(area)[[len(np.flatnonzero(area)) // 4,
                                                                               3 * len(np.flatnonzero(area)) // 4]]]})
    scores = []
    for index in picks[:slices]:
        geometry = page.show_image(index)
        page.set_segment_visibility(set(), values)
        hidden = page.canvas().astype(int)
        source = by_uid[geometry["sop"]]
        expected = _labels_on_canvas(geometry, source, truth[geometry["sop"]], hidden.shape[:2])
        for value in values:
            page.set_segment_visibility({value}, values)
            drawn = np.abs(page.canvas().astype(int) - hidden).sum(axis=2) > 30
            wanted = expected == value
            if wanted.sum() < 50:  # a few voxels at this zoom: too small to score
                continue
            scores.append(2 * (drawn & wanted).sum() / (drawn.sum() + wanted.sum()))
    page.set_segment_visibility(set(values), values)
    return scores


def _labels_on_canvas(geometry: dict, source: Dataset, labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The SEG's label under each canvas pixel centre: OHIF's camera to patient mm, the source's own header
    (Image Position/Orientation, Pixel Spacing) to its pixel indices."""
    ys, xs = np.mgrid[:shape[0], :shape[1]] + 0.5
    world = (np.asarray(geometry["origin"]) + xs[..., None] * np.asarray(geometry["dx"])
             + ys[..., None] * np.asarray(geometry["dy"]))
    position = np.asarray(source.ImagePositionPatient, float)
    iop = np.asarray(source.ImageOrientationPatient, float)
    row_spacing, col_spacing = (float(v) for v in source.PixelSpacing)
    col = np.rint((world - position) @ iop[:3] / col_spacing).astype(int)
    row = np.rint((world - position) @ iop[3:] / row_spacing).astype(int)
    inside = (row >= 0) & (row < labels.shape[0]) & (col >= 0) & (col < labels.shape[1])
    out = np.zeros(shape, np.uint8)
    out[inside] = labels[row[inside], col[inside]]
    return out


def _assert_segments_as_the_model_defines_them(page: OHIFPage, manifest: Manifest) -> None:
    shown = page.segments()
    assert [(i, name) for i, name, _ in shown] == [(lb.value, lb.name) for lb in manifest.labels]
    for (_, name, rgb), label in zip(shown, manifest.labels):  # CIELab in the file: rounding only
        assert np.abs(np.subtract(rgb, label.color)).max() <= 2, (name, rgb, label.color)


@pytest.mark.parametrize("case, options, kind", [
    ("axial", CTOptions(matrix=96, slice_spacing=5.0, z_extent_mm=120.0, fov_mm=380.0), "BINARY"),
    ("reversed-oblique", CTOptions(matrix=96, slice_spacing=5.0, z_extent_mm=120.0, fov_mm=380.0,
                                   reversed_order=True, oblique_deg=15.0), "BINARY"),
    ("labelmap", CTOptions(matrix=96, slice_spacing=5.0, z_extent_mm=120.0, fov_mm=380.0), "LABELMAP"),
])
def test_seg_is_drawn_where_the_file_puts_it_with_the_models_segments(viewer, tmp_path, case, options, kind):
    pacs, served, browser = viewer
    study = _ct_study(pacs, tmp_path / case, seed=len(case), options=options, kind=kind)
    page = OHIFPage(browser, served.study_url(study.uid))
    try:
        page.open_series(str(study.seg.SeriesDescription))
        _assert_segments_as_the_model_defines_them(page, study.manifest)
        scores = _overlay_dice(page, study)
        assert len(scores) >= 6 and min(scores) >= 0.95, scores
        assert page.errors == []
    finally:
        page.close()


def _sr_outlines(sr: Dataset) -> dict[str, tuple[str, np.ndarray]]:
    """Tracking UID -> (image SOP Instance UID, SCOORD points) of each outline group in the SR file."""
    parsed = hd.sr.Comprehensive3DSR.from_dataset(sr)
    out = {}
    for group in parsed.content.get_planar_roi_measurement_groups():
        if group.roi is not None:
            reference = group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            out[str(group.tracking_uid)] = (str(reference), np.asarray(group.roi.value, float))
    return out


def _assert_sr_listed_and_drawn(page: OHIFPage, study: Study) -> None:
    """Every segment's measurements listed (the volume or area the file holds) and its outline drawn on the
    image the SR names, at the SR's coordinates (cornerstone counts pixel centres at integers: within 1 px)."""
    measured = page.sr_measurements()
    parsed = hd.sr.Comprehensive3DSR.from_dataset(study.sr)
    groups = parsed.content.get_volumetric_roi_measurement_groups() or [
        g for g in parsed.content.get_planar_roi_measurement_groups() if g.referenced_segmentation_frame]
    assert sorted(m["name"] for m in measured) == sorted(str(g.tracking_identifier) for g in groups)
    for group in groups:
        (shown,) = [m for m in measured if m["name"] == group.tracking_identifier]
        size = next(m for m in group.get_measurements() if m.name.meaning in ("Volume", "Area"))
        assert [size.name.meaning, f"{size.value:.2f} {size.unit.value}"] in shown["labels"], shown
        assert shown["loaded"] and shown["graphic"] == "POLYLINE", shown
    outlines, drawn = _sr_outlines(study.sr), page.drawn_outlines()
    assert drawn, "no outline drawn"
    for uid, points in drawn.items():
        sop, written = outlines[uid]
        assert len(points) == len(written)
        assert np.abs(points - written).max() <= 1.0, uid


def _dx_study(pacs, folder: Path, key: str = "viewer-dx") -> Study:
    dx = generate_dx(4, DXOptions(matrix=256))
    path = write_dx(dx, folder)
    sources, order, seg, sr, manifest = _result([path], dx.labels[None], DX_MODEL, key)
    _store(pacs, [dcmread(path), seg, sr])
    return Study(str(sources[0].StudyInstanceUID), sources, order, seg, sr, manifest)


def test_sr_of_a_ct_opens_with_every_segment_measured_and_outlined(viewer, tmp_path):
    """OHIF used to crash on segnode's SR ("Something went wrong": a measurement group without a SCOORD)."""
    pacs, served, browser = viewer
    study = _ct_study(pacs, tmp_path / "ct", seed=11, options=CTOptions(matrix=96, slice_spacing=5.0,
                                                                      z_extent_mm=120.0, fov_mm=380.0))
    page = OHIFPage(browser, served.study_url(study.uid))
    try:
        page.open_series(str(study.sr.SeriesDescription))
        _assert_sr_listed_and_drawn(page, study)
        assert page.errors == []
    finally:
        page.close()


def test_a_radiograph_result_is_seen_in_ohif_through_its_sr(viewer, tmp_path):
    """OHIF's SEG loader needs a patient orientation a projection radiograph does not have (segnode writes
    none rather than a guessed one): the radiologist sees the DX result as the SR's outlines with the areas."""
    pacs, served, browser = viewer
    study = _dx_study(pacs, tmp_path / "dx")
    page = OHIFPage(browser, served.study_url(study.uid))
    try:
        page.open_series(str(study.sr.SeriesDescription))
        _assert_sr_listed_and_drawn(page, study)
        assert len(page.drawn_outlines()) == len(study.manifest.labels)
        assert page.errors == []
    finally:
        page.close()


def test_a_superseded_result_is_told_apart_from_the_current_one(viewer, tmp_path):
    """A late instance re-ran the series: the PACS holds both results; the study browser says which is current,
    and the current one loads."""
    pacs, served, browser = viewer
    phantom = generate_ct(12, CTOptions(matrix=96, slice_spacing=5.0, z_extent_mm=120.0, fov_mm=380.0))
    files = write_phantom(phantom, tmp_path / "ct")
    *_, old_seg, old_sr, _ = _result(files, phantom.labels, CT_MODEL, "viewer-first")
    sources, order, seg, sr, manifest = _result(files, phantom.labels, CT_MODEL, "viewer-again", previous=old_sr)
    _store(pacs, [dcmread(f) for f in files] + [old_seg, old_sr, seg, sr])
    study = Study(str(sources[0].StudyInstanceUID), sources, order, seg, sr, manifest)
    page = OHIFPage(browser, served.study_url(study.uid))
    try:
        shown = page.series_descriptions()
        assert {str(old_seg.SeriesDescription), str(old_sr.SeriesDescription)} <= set(shown)
        assert {str(seg.SeriesDescription), str(sr.SeriesDescription)} <= set(shown)
        assert all(d.endswith("revised") for d in (seg.SeriesDescription, sr.SeriesDescription))
        page.open_series(str(seg.SeriesDescription))
        _assert_segments_as_the_model_defines_them(page, manifest)
        scores = _overlay_dice(page, study, slices=1)
        assert scores and min(scores) >= 0.95, scores
        assert page.errors == []
    finally:
        page.close()
