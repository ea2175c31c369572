"""Results (and contour images) delivered to a real Orthanc over C-STORE and STOW-RS, confirmed through
its REST API; retried while it is down, dead-lettered with the reason when the destination is wrong."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from pydicom import dcmread

from segnode import pipeline
from segnode.audit.ledger import Ledger
from segnode.config import Destination
from segnode.imaging.volume import read_series
from segnode.jobs import queue
from peers import free_port, orthanc
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom
from tests.conftest import audit_events, storescu


@pytest.fixture
def pacs(tmp_path):
    with orthanc(tmp_path / "orthanc") as server:
        yield server


def _configure(node, pacs, default: str, **extra_destinations) -> Ledger:
    node.settings.destinations = {
        "pacs": Destination(kind="dimse", ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port,
                            orthanc_url=pacs.url),
        "web": Destination(kind="dicomweb", url=f"{pacs.url}/dicom-web", orthanc_url=pacs.url),
        **extra_destinations}
    node.settings.routing = node.settings.routing.model_copy(update={"stable_seconds": 0.3,
                                                                     "default_destinations": [default]})
    node.settings.jobs = node.settings.jobs.model_copy(update={"backoff_seconds": 0.2, "max_attempts": 2,
                                                               "delivery_attempts": 2})
    return Ledger(node.engine, node.trail)


def _send_and_segment(node, led, tmp_path, seed: int = 3):
    phantom = generate_ct(seed, CTOptions(matrix=64, slice_spacing=4.0, z_extent_mm=240.0))
    files = write_phantom(phantom, tmp_path / f"ct-{seed}")
    assert storescu(node.dimse.port, files).returncode == 0
    time.sleep(0.4)
    assert pipeline.completion(node.settings, led).poll()
    worker = pipeline.worker(node.settings, led)
    assert worker.run_once()  # the segmentation job; it queues the delivery
    return phantom, files, worker


def _jobs(node):
    with node.engine.connect() as conn:
        return queue.list_jobs(conn)


def _in_orthanc(pacs, uid: str) -> bool:
    return bool(httpx.post(f"{pacs.url}/tools/lookup", content=uid, timeout=10).json())


@pytest.mark.parametrize("via", ["pacs", "web"])
def test_seg_and_sr_arrive_in_orthanc_confirmed(node, pacs, tmp_path, via):
    led = _configure(node, pacs, via)
    contours = via == "web"  # contour images too, on one of the two ways
    node.settings.outputs = node.settings.outputs.model_copy(update={"secondary_capture": contours})
    phantom, files, worker = _send_and_segment(node, led, tmp_path)
    segment, delivery = _jobs(node)
    assert delivery.kind == "deliver" and delivery.destination == via and delivery.parent_job == segment.id
    assert worker.run_once()
    segment, delivery = _jobs(node)
    assert delivery.state == "succeeded", delivery.last_error
    record = json.loads((node.settings.data_dir / segment.output / "segmentation.json").read_text())
    for kind in ("seg", "sr"):
        assert _in_orthanc(pacs, record["outputs"][kind]["sop_instance_uid"])
    events = {e.event_id: e for e in audit_events(node)}
    assert "110102" in events and "confirmed by Orthanc REST" in events["110104"].detail
    assert json.loads(events["110104"].objects)["answers"]
    # volumes within 5 % of the phantom's truth for the large organs
    vol = read_series(files)
    voxel_ml = abs(np.linalg.det(vol.affine[:3, :3])) / 1000
    for value, name in ((1, "liver"), (5, "spine")):
        truth = (phantom.labels == value).sum() * voxel_ml
        assert record["outputs"]["volumes_ml"][name] == pytest.approx(truth, rel=0.05), name
    seg = dcmread(node.settings.data_dir / segment.output / "seg.dcm")
    stored = httpx.get(f"{pacs.url}/instances/{httpx.post(f'{pacs.url}/tools/lookup', content=seg.SOPInstanceUID).json()[0]['ID']}/simplified-tags",
                       timeout=10).json()
    assert stored["StudyInstanceUID"] == dcmread(files[0]).StudyInstanceUID  # beside the images in the PACS
    study = dcmread(files[0]).StudyInstanceUID
    trace = subprocess.run([sys.executable, "-m", "segnode", "audit", "trace", study, "--data-dir",
                            str(node.settings.data_dir)], capture_output=True, text=True, timeout=120)
    assert trace.returncode == 0, trace.stderr
    for step in (f"{len(files)} instance(s) from dimse:TESTSCU@127.0.0.1", "completion: complete", "by quiet",
                 "routing (generation 1): rules ct-abdomen -> ct-abdomen-phantom-3d; rule set sha256",
                 f"job {segment.id}: ct-abdomen-phantom-3d 1.1.0 (weights sha256", "software segnode",
                 f"SEG {record['outputs']['seg']['sop_instance_uid']} sha256",
                 f"job {delivery.id}: deliver job {segment.id}'s results to {via}: succeeded",
                 "DICOM Instances Transferred: confirmed by Orthanc REST"):
        assert step in trace.stdout, step
    names = record["outputs"]["secondary_capture"]
    assert (0 < len(names) <= len(files)) if contours else names == []
    if contours:  # every picture confirmed in the PACS, in its own series, and counted in the trace
        first = dcmread(node.settings.data_dir / segment.output / names[0])
        series = httpx.post(f"{pacs.url}/tools/lookup", content=first.SeriesInstanceUID, timeout=10).json()[0]["ID"]
        assert len(httpx.get(f"{pacs.url}/series/{series}", timeout=10).json()["Instances"]) == len(names)
        assert f"contour images (secondary capture): {len(names)}" in trace.stdout
    story = json.loads(subprocess.run([sys.executable, "-m", "segnode", "audit", "trace", study, "--json", "--data-dir",
                                       str(node.settings.data_dir)], capture_output=True, text=True).stdout)
    assert story["jobs"][0]["result"]["files_sha256"]["seg.dcm"] == hashlib.sha256(
        (node.settings.data_dir / segment.output / "seg.dcm").read_bytes()).hexdigest()


@pytest.mark.parametrize("via, error", [("pacs", "did not accept an association"), ("web", "STOW-RS to http")])
def test_delivery_waits_for_orthanc_to_come_back(node, pacs, tmp_path, via, error):
    led = _configure(node, pacs, via)
    _, _, worker = _send_and_segment(node, led, tmp_path)
    pacs.stop()
    assert worker.run_once()
    delivery = _jobs(node)[1]
    assert delivery.state == "failed" and error in delivery.last_error
    pacs.start()
    time.sleep(0.25)
    assert worker.run_once()
    delivery = _jobs(node)[1]
    assert delivery.state == "succeeded" and delivery.attempts == 2
    failed = [e for e in audit_events(node) if e.event_id == "110104" and e.outcome != 0]
    assert len(failed) == 1 and "failed" in failed[0].detail


def test_a_wrong_destination_ends_in_the_dead_letter_with_its_reason(node, pacs, tmp_path):
    nowhere = Destination(kind="dimse", ae_title="NOBODY", host="127.0.0.1", port=free_port())
    led = _configure(node, pacs, "nowhere", nowhere=nowhere)
    _, _, worker = _send_and_segment(node, led, tmp_path)
    assert worker.run_once()
    time.sleep(0.25)
    assert worker.run_once()
    delivery = _jobs(node)[1]
    assert delivery.state == "dead" and delivery.attempts == 2
    assert "NOBODY@127.0.0.1" in delivery.last_error and "did not accept an association" in delivery.last_error



def test_a_destination_no_longer_configured_is_dead_at_once_with_what_to_do(node, pacs, tmp_path):
    """Retrying cannot help until the operator configures it again: no attempts burnt on backoff."""
    led = _configure(node, pacs, "pacs")
    _, _, worker = _send_and_segment(node, led, tmp_path)
    node.settings.routing = node.settings.routing.model_copy(update={"default_destinations": []})
    node.settings.destinations = {}  # removed from the configuration after the job was queued
    worker = pipeline.worker(node.settings, led)
    assert worker.run_once()
    delivery = _jobs(node)[1]
    assert delivery.state == "dead" and delivery.attempts == 1
    assert "destination 'pacs' is not configured" in delivery.last_error and "retry the job" in delivery.last_error
