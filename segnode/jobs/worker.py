"""The worker loop: reap expired leases, claim a job, run its model on the series, record the result.

Any number of workers (processes) may share one queue. A job's lease is renewed while it runs; a
worker that dies stops renewing and the job is queued again. A job's output is its folder
results/<job id>/: labels.nii.gz, seg.dcm, sr.dcm and segmentation.json (what produced them).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from sqlalchemy import select

from segnode.audit import trail as audit
from segnode.audit.ledger import Ledger
from segnode.config import Destination, OutputsConfig
from segnode.delivery.send import DeliveryError, deliver
from segnode.imaging.volume import SeriesError
from segnode.inference.engine import EngineOptions, engine_for
from segnode.inference.infer import infer_series
from segnode.jobs import queue
from segnode.models.registry import read_manifest
from segnode.outputs.files import result_files
from segnode.outputs.results import encode_results
from segnode.routing.router import series_input

log = logging.getLogger(__name__)
RESULTS = "results"

Runner = Callable[[dict[str, Any], list[Path], Path], str]  # (job, instance files, output folder) -> detail


class Worker:
    def __init__(self, ledger: Ledger, data_dir: Path, spool_root: Path, models_dir: Path, lease_seconds: float,
                 backoff_seconds: float, device: str = "auto", runner: Runner | None = None,
                 destinations: dict[str, Destination] | None = None, default_destinations: Sequence[str] = (),
                 calling_ae: str = "SEGNODE", outputs: OutputsConfig | None = None) -> None:
        self.ledger, self.data_dir, self.spool_root, self.models_dir = ledger, data_dir, spool_root, models_dir
        self.lease, self.backoff = lease_seconds, backoff_seconds
        self.options = EngineOptions(device=device)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.runner = runner or self._infer
        self.destinations = destinations or {}
        self.default_destinations = list(default_destinations)
        self.calling_ae = calling_ae
        self.outputs = outputs or OutputsConfig()

    def warm(self, models: Sequence[str]) -> None:
        """Load these models and run one batch through each before taking jobs: the first study would
        otherwise wait for it (4 s for the CT model on 2 CPU cores; cuDNN's autotuning on a GPU). A model
        that fails here is only logged: its job will fail with the reason, retried and audited."""
        for name in models:
            try:
                seconds = engine_for(self.models_dir / name, self.options).warm_up()
            except Exception as exc:  # noqa: BLE001 - the job reports it properly
                log.warning("model %s could not be loaded in advance (%s); its jobs will say why", name, exc)
            else:
                log.info("model %s warm (one batch in %.2f s)", name, seconds)

    def _deliver(self, job: dict[str, Any]) -> str:
        """Send the parent job's SEG, SR (and contour images) to the job's destination and have the PACS
        confirm them."""
        name = job["destination"]
        dest = self.destinations.get(name)
        if dest is None:
            raise DeliveryError(f"destination {name!r} is not configured (any more); configured: "
                                f"{', '.join(self.destinations) or 'none'}")
        with self.ledger.engine.connect() as conn:
            parent = conn.execute(select(queue.JOBS.c.output).where(queue.JOBS.c.id == job["parent_job"])).scalar()
        if not parent:
            raise DeliveryError(f"job {job['parent_job']} has no results to deliver")
        files, missing = result_files(self.data_dir / parent)
        if missing:
            raise DeliveryError(f"job {job['parent_job']}'s results are missing: {', '.join(missing)}")
        actor = {"component": "worker", "worker": self.owner, "destination": name}
        objects = {"job_id": job["id"], "study_uid": job["study_uid"], "series_uid": job["series_uid"],
                   "destination": name, "files": [f.name for f in files]}
        with self.ledger.transaction() as (_, append):
            append(audit.Event(audit.BEGIN_TRANSFERRING, audit.ACTION_EXECUTE, audit.SUCCESS, actor, objects, None,
                               f"sending {len(files)} instance(s) to {name} ({dest.kind})"))
        try:
            delivered = deliver(dest, files, self.calling_ae)
        except Exception as exc:
            with self.ledger.transaction() as (_, append):
                append(audit.Event(audit.INSTANCES_TRANSFERRED, audit.ACTION_EXECUTE, audit.MAJOR_FAILURE, actor,
                                   objects, None, f"delivery to {name} failed: {exc}"))
            raise
        with self.ledger.transaction() as (_, append):
            append(audit.Event(audit.INSTANCES_TRANSFERRED, audit.ACTION_EXECUTE, audit.SUCCESS, actor,
                               dict(objects, answers=delivered.answers), None, delivered.confirmed))
        return f"delivered to {name}: {delivered.confirmed}"

    def _infer(self, job: dict[str, Any], files: list[Path], out: Path) -> str:
        folder = self.models_dir / job["model"]
        manifest = read_manifest(folder)
        if (manifest.version, manifest.weights_sha256) != (job["model_version"], job["weights_sha256"]):
            raise RuntimeError(f"model {job['model']} is now {manifest.version} (weights {manifest.weights_sha256[:12]}),"
                               f" the job was queued for {job['model_version']} ({job['weights_sha256'][:12]}); "
                               f"retry the job to run the installed version")
        result = infer_series(folder, files, out, self.options)
        encoded = encode_results(result, files, manifest, job["idempotency_key"], out, self.outputs.seg_type,
                                 self.outputs.secondary_capture)
        overlays = f", {len(encoded.overlays)} contour image(s)" if encoded.overlays else ""
        return (f"{job['model']} {job['model_version']} -> SEG {encoded.seg_uid}, SR {encoded.sr_uid}{overlays} "
                f"({result.segmentation.timings})")

    def run_once(self) -> bool:
        """Handle at most one job; False when there was nothing to do."""
        queue.reap(self.ledger)
        job = queue.claim(self.ledger.engine, self.owner, self.lease)
        if job is None:
            return False
        log.info("job %d: %s on series (attempt %d of %d)", job["id"], job["model"], job["attempts"],
                 job["max_attempts"])
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(job["id"], stop), daemon=True)
        renewer.start()
        try:
            if job["kind"] == "deliver":
                queue.finish(self.ledger, job, self.owner, "", self._deliver(job))
                return True
            with self.ledger.engine.connect() as conn:
                series = series_input(conn, job["series_uid"], job["generation"])
            if series.input_sha256 != job["input_sha256"]:
                queue.finish(self.ledger, job, self.owner, "", "the series changed before this job ran; the job "
                             "for its new version covers it", state="superseded")
                return True
            out = self.data_dir / RESULTS / str(int(job["id"]))
            files = [self.spool_root / path for _, _, path in series.instances]
            detail = self.runner(job, files, out)
            targets = json.loads(job["destinations"]) or self.default_destinations
            if not queue.finish(self.ledger, job, self.owner, str(out.relative_to(self.data_dir)), detail,
                                deliver_to=targets):
                log.warning("job %d finished after its lease was lost; another worker owns it now", job["id"])
        except SeriesError as exc:  # the input itself cannot be segmented: retrying will not help
            log.warning("job %d refused its series: %s", job["id"], exc)
            queue.fail(self.ledger, job, self.owner, f"refused: {exc}", self.backoff, final=True)
        except Exception as exc:
            log.exception("job %d failed", job["id"])
            state = queue.fail(self.ledger, job, self.owner, f"{type(exc).__name__}: {exc}", self.backoff)
            log.warning("job %d is now %s", job["id"], state)
        finally:
            stop.set()
            renewer.join()
        return True

    def _renew(self, job_id: int, stop: threading.Event) -> None:
        while not stop.wait(self.lease / 3):
            if not queue.renew(self.ledger.engine, job_id, self.owner, self.lease):
                log.warning("job %d: lease lost", job_id)
                return

    def run(self, stop: Callable[[], bool], idle_seconds: float = 0.5) -> None:
        while not stop():
            try:
                busy = self.run_once()
            except Exception:
                log.exception("worker loop error; continuing")
                busy = False
            if not busy:
                time.sleep(idle_seconds)
