"""`segnode demo`: Orthanc (Debian package) + segnode in one process; a CT and a chest radiograph phantom
go in with dcmtk's storescu as a modality would send them (to segnode and to the PACS); SEG and SR come
out in Orthanc, confirmed; per-organ volumes, Dice against the phantom truth, and the study's lineage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from segnode import pipeline
from segnode.audit.trail import verify_connection
from segnode.config import Settings
from segnode.datadir import LABELS_FILE, RECORD_FILE
from segnode.demo.pacs import PACS, RunningOrthanc, orthanc
from segnode.demo.viewer import Viewer, ohif
from segnode.flow import JobKind, JobState
from segnode.imaging.nifti import read_labels
from segnode.imaging.volume import read_series
from segnode.jobs.queue import list_jobs
from segnode.lineage import render, trace
from segnode.logs import setup_logging
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom
from segnode.phantom.dx import DXOptions, generate_dx, write_dx
from segnode.service import Node
from segnode.tools import ToolMissing, dcmtk
from segnode.training.metrics import label_metrics


@dataclass(frozen=True)
class DemoOptions:
    data_dir: Path
    seed: int = 1
    slice_spacing: float = 5.0  # mm between CT slices
    orthanc_url: str | None = None  # an Orthanc already running (REST URL), instead of starting one
    keep: bool = False  # leave both running until Ctrl-C


def run_demo(options: DemoOptions, settings_for: Callable[[Path, PACS], Settings],
             say: Callable[[str], None], stage: Callable[[str], None] = lambda _: None) -> int:
    """Run the demo; `settings_for(data_dir, pacs)` gives the node's settings once the PACS is known, `say`
    shows the user each line of the report (the CLI prints them) and `stage` what is happening meanwhile
    (segnode.progress: on a terminal only).

    Returns:
        0 when every job and delivery succeeded and the audit trail verifies, else 1.
    Raises:
        ToolMissing: Orthanc or dcmtk is not installed, or no Orthanc answers at `orthanc_url`.
    """
    env = dict(os.environ, TCP_NODELAY="1")
    stage("starting the PACS (Orthanc)" if not options.orthanc_url else f"connecting to Orthanc at {options.orthanc_url}")
    with ExitStack() as stack:
        pacs: PACS = (stack.enter_context(RunningOrthanc.at(options.orthanc_url)) if options.orthanc_url
                      else stack.enter_context(orthanc(options.data_dir / "orthanc")))
        viewer = _viewer(stack, options.data_dir / "viewer", pacs, say)
        settings = settings_for(options.data_dir, pacs)
        data = settings.data
        setup_logging(settings.log_level)
        stage("starting segnode")
        node = Node(settings)
        node.start()
        try:
            say(f"Orthanc ({'already running' if options.orthanc_url else 'test PACS'}) at {pacs.url}, DICOM "
                  f"{pacs.aet}@{pacs.host}:{pacs.dicom_port}; segnode "
                  f"{settings.dimse.ae_title}@127.0.0.1:{node.dimse.port}, results to Orthanc")
            phantoms = options.data_dir / "phantoms"
            stage("generating the CT and chest radiograph phantoms")
            ct = generate_ct(options.seed, CTOptions(matrix=256, slice_spacing=options.slice_spacing))
            dx = generate_dx(options.seed, DXOptions(matrix=512))
            cases = [("CT", "DEMO_CT", write_phantom(ct, phantoms / "ct"), ct.labels, ct.label_names),
                     ("DX", "DEMO_DX", [write_dx(dx, phantoms / "dx")], dx.labels[None], dx.label_names)]
            truths, kinds = {}, {}
            for what, aet, files, labels, names in cases:
                stage(f"sending the {what} phantom with storescu (as {aet}) to segnode and to Orthanc")
                for ae, host, port in ((settings.dimse.ae_title, "127.0.0.1", node.dimse.port),
                                       (pacs.aet, pacs.host, pacs.dicom_port)):
                    subprocess.run([dcmtk("storescu"), "-aec", ae, "-aet", aet, host, str(port),
                                    *map(str, files)], check=True, env=env)  # as a modality: to segnode and the PACS
                vol = read_series(files)
                truths[vol.series_uid] = (labels[[f for f, _ in vol.order]], names, vol)
                kinds[vol.series_uid] = what
                say(f"{what} phantom (seed {options.seed}): {len(files)} image(s) sent with storescu to segnode and Orthanc")
            completion, worker = pipeline.completion(settings, node.ledger), pipeline.worker(settings, node.ledger)
            deadline = time.monotonic() + 600
            stage("waiting for the series to complete (quiet for routing.stable_seconds)")
            while time.monotonic() < deadline:
                completion.poll()
                while True:
                    with node.engine.connect() as conn:  # a reused data directory may hold older studies
                        jobs = [j for j in list_jobs(conn) if j.series_uid in truths]
                    ready = [j for j in jobs if j.state in (JobState.QUEUED, JobState.FAILED)]
                    if ready:
                        j = ready[0]
                        stage(f"segmenting the {kinds[j.series_uid]} series with {j.model}"
                              if j.kind == JobKind.SEGMENT else f"delivering job {j.parent_job}'s SEG and SR to "
                              f"{j.destination}")
                    if not worker.run_once():
                        break
                with node.engine.connect() as conn:
                    jobs = [j for j in list_jobs(conn) if j.series_uid in truths]
                if len([j for j in jobs if j.kind == JobKind.DELIVER and j.state in (JobState.SUCCEEDED, JobState.DEAD)]) >= 2:
                    break
                time.sleep(0.5)
            ok = True
            for job in (j for j in jobs if j.kind == JobKind.SEGMENT):
                labels_truth, names, vol = truths[job.series_uid]
                out = data.path(job.output)
                record = json.loads((out / RECORD_FILE).read_text())
                labels, _ = read_labels(out / LABELS_FILE)
                metrics = label_metrics(labels, labels_truth, list(names), vol.spacing)
                # a radiograph is measured in cm² on its plane; a volume in mL
                unit, key = ("cm²", "areas_cm2") if vol.projection else ("mL", "volumes_ml")
                voxel = (vol.spacing[1] * vol.spacing[2] / 100 if vol.projection
                         else abs(float(np.linalg.det(vol.affine[:3, :3]))) / 1000)
                say(f"\n{job.model} {job.model_version} (rule {job.rule}): {job.state}")
                for value, name in names.items():
                    truth = float((labels_truth == value).sum()) * voxel
                    got = record.get("outputs", {}).get(key, {}).get(name, 0.0)
                    say(f"  {name:14s} {got:9.1f} {unit} (truth {truth:9.1f} {unit})  Dice {metrics[value]['dice']:.3f}")
                ok &= job.state == JobState.SUCCEEDED
            for job in (j for j in jobs if j.kind == JobKind.DELIVER):
                say(f"delivery job {job.id} to {job.destination}: {job.state}"
                      + (f" ({job.last_error})" if job.last_error else ""))
                ok &= job.state == JobState.SUCCEEDED
            study = _study_of(cases[0][2][0])
            say(f"\nin Orthanc: {pacs.url}/app/explorer.html (the CT study holds the images, the SEG and the SR)")
            if viewer is not None:
                for what, _, files, *_ in cases:
                    say(f"in OHIF, the {what} study: {viewer.study_url(_study_of(files[0]))}")
                if not options.keep:
                    say("(these links work while the demo runs: run it with --keep to leave Orthanc and OHIF up)")
            with node.engine.connect() as conn:
                say("\n".join(render(trace(conn, data, study))))
                verified = verify_connection(conn, data.audit_head)
            say(f"audit trail: {verified.count} events, {'intact' if verified.ok else 'BROKEN'}; data in {options.data_dir}")
            if options.keep:
                say("running until Ctrl-C (--keep)" + (f"; OHIF at {viewer.url}" if viewer else ""))
                stop = threading.Event()
                signal.signal(signal.SIGINT, lambda *_: stop.set())
                stop.wait()
            return 0 if ok and verified.ok else 1
        finally:
            node.stop()



def _viewer(stack: ExitStack, workdir: Path, pacs: PACS, say: Callable[[str], None]) -> Viewer | None:
    """OHIF for the PACS, or None (said why) when nginx or OHIF's dist is missing: the demo's results are in
    the PACS either way."""
    try:
        return stack.enter_context(ohif(workdir, f"{pacs.url}/dicom-web/", pacs.username, pacs.password))
    except ToolMissing as exc:
        say(f"viewer: not started ({exc})")
        return None


def _study_of(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
