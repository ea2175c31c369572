"""The worker loop: reap expired leases, claim a job, run its model on the series, record the result.

Any number of workers (processes) may share one queue. A job's lease is renewed while it runs; a
worker that dies stops renewing and the job is queued again. A job's output is its folder
results/<job id>/ (segnode.datadir): labels.nii.gz, seg.dcm, sr.dcm and segmentation.json (what
produced them). Whether a failed job is tried again is decided by `SegnodeError.retryable` alone;
an exception that is not a SegnodeError (a bug, an environment fault) is retried too, as it may pass.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Sequence


from segnode.audit import events as audit
from segnode.audit.ledger import Ledger
from segnode.config import OutputsConfig, Settings
from segnode.datadir import SR_FILE, result_files
from segnode.delivery.send import DeliveryError, deliver
from segnode.errors import ConfigurationError, SegnodeError
from segnode.flow import Job, JobKind, JobState, seconds_since
from segnode.imaging.volume import SeriesError
from segnode.inference.engine import EngineOptions, engine_for
from segnode.inference.infer import infer_series
from segnode.jobs import queue
from segnode.metrics import STAGE_SECONDS, record_gpu_memory, timed
from segnode.db.queries import completed_series
from segnode.models.registry import read_manifest
from segnode.outputs.results import encode_results

log = logging.getLogger(__name__)

Runner = Callable[[Job, list[Path], Path], str]  # (job, instance files, output folder) -> detail for the audit


class ModelVersionMismatch(ConfigurationError):
    """The installed model is not the version (or weights) the job was queued for: running it would
    produce a result whose provenance differs from what the routing decision recorded."""


def segment(job: Job, files: list[Path], out: Path, models_dir: Path, options: EngineOptions, outputs: OutputsConfig,
            previous_sr: Path | None = None) -> str:
    """Run a segment job's model on its instance files and encode SEG + SR into `out`; the same code on the
    node's workers and on remote ones (segnode.remote.worker).

    Args:
        job: the job as queued (model, version and weights it was routed to, the rule's assumed spacing).
        files: the series' instance files, in the index's order.
        out: the result folder to write (labels.nii.gz, seg.dcm, sr.dcm, segmentation.json, contour images).
        models_dir: where the model folders are.
        options: the inference device and engine options.
        outputs: the node's output settings (SEG encoding, contour images).
        previous_sr: the SR of the result this one supersedes, when there is one.

    Returns:
        What the audit event says about the result.

    Raises:
        ModelVersionMismatch: the installed model is not the one the job was queued for.
        SegnodeError: the series cannot be read or segmented (retryable or not, as it says).
    """
    folder = models_dir / job.model
    manifest = read_manifest(folder)
    if (manifest.version, manifest.weights_sha256) != (job.model_version, job.weights_sha256):
        raise ModelVersionMismatch(
            f"model {job.model} is now {manifest.version} (weights {manifest.weights_sha256[:12]}), the job was "
            f"queued for {job.model_version} ({job.weights_sha256[:12]}); retrying cannot help: install that "
            f"version again and retry the job, or send the series again to have it routed to the installed one")
    result = infer_series(folder, files, out, options, assumed_spacing=job.assumed_spacing_mm)
    for stage, seconds in result.segmentation.timings.as_dict().items():
        STAGE_SECONDS.labels(stage).observe(seconds)
    with timed("encode"):
        encoded = encode_results(result, files, manifest, job.idempotency_key, out, outputs, previous_sr=previous_sr)
    record_gpu_memory()
    overlays = f", {len(encoded.overlays)} contour image(s)" if encoded.overlays else ""
    if result.volume.assumed_spacing:
        overlays += (f"; pixel spacing ASSUMED {job.assumed_spacing_mm:g} mm (rule {job.rule}), not measured: "
                     "sizes are estimates")
    return (f"{job.model} {job.model_version} -> SEG {encoded.seg_uid}, SR {encoded.sr_uid}{overlays} "
            f"({result.segmentation.timings})")


class Worker:
    """Takes jobs from the queue until told to stop: segmentations and deliveries.

    Args:
        ledger: the database (queue, index) and the audit trail.
        settings: data directory, models, lease and backoff (`jobs`), destinations, outputs, and the
            AE title deliveries call from (`dimse.ae_title`).
        runner: what a segment job runs (job, its instance files, its result folder) -> audit detail;
            the default reads the series, segments it and encodes SEG + SR. Tests replace it.
    """

    def __init__(self, ledger: Ledger, settings: Settings, *, runner: Runner | None = None) -> None:
        self.ledger, self.settings, self.data = ledger, settings, settings.data
        self.models_dir = settings.models_root
        self.options = EngineOptions(device=settings.jobs.device)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.runner = runner or self._infer

    def warm(self, models: Sequence[str]) -> None:
        """Load these models and run one batch through each before taking jobs: the first study would
        otherwise wait for it (4 s for the CT model on 2 CPU cores; cuDNN's autotuning on a GPU). A model
        that fails here is only logged: its job will fail with the reason, audited.

        Args:
            models: model folder names under the models root.
        """
        for name in models:
            try:
                seconds = engine_for(self.models_dir / name, self.options).warm_up()
            except Exception as exc:  # noqa: BLE001 - the job reports it properly
                log.warning("model %s could not be loaded in advance (%s); its jobs will say why", name, exc)
            else:
                log.info("model %s warm (one batch in %.2f s)", name, seconds)

    def _deliver(self, job: Job) -> str:
        """Send the parent job's SEG, SR (and contour images) to the job's destination and have the PACS
        confirm them."""
        name = job.destination
        destinations = self.settings.destinations
        dest = destinations.get(name)
        if dest is None:
            raise DeliveryError(f"destination {name!r} is not configured (any more); configured: "
                                f"{', '.join(destinations) or 'none'}; add it and retry the job", retryable=False)
        with self.ledger.engine.connect() as conn:
            parent = queue.job_output(conn, job.parent_job) if job.parent_job is not None else ""
        if not parent:
            raise DeliveryError(f"job {job.parent_job} has no results to deliver", retryable=False)
        try:
            files, missing = result_files(self.data.path(parent))
        except ValueError as exc:  # a record that names paths, or is not JSON: nothing of it is sent
            raise DeliveryError(f"job {job.parent_job}'s result record cannot be used ({exc}); send the series "
                                f"again to have it segmented again", retryable=False) from exc
        if missing:
            raise DeliveryError(f"job {job.parent_job}'s results are missing: {', '.join(missing)}; send the "
                                f"series again to have it segmented again", retryable=False)
        actor = {"component": "worker", "worker": self.owner, "destination": name}
        objects = {"job_id": job.id, "study_uid": job.study_uid, "series_uid": job.series_uid,
                   "destination": name, "files": [f.name for f in files]}
        with self.ledger.transaction() as (_, append):
            append(audit.Event(type=audit.BEGIN_TRANSFERRING, action=audit.Action.EXECUTE,
                               outcome=audit.Outcome.SUCCESS, actor=actor, objects=objects,
                               detail=f"sending {len(files)} instance(s) to {name} ({dest.kind})"))
        try:
            with timed("deliver"):
                delivered = deliver(dest, files, self.settings.dimse.ae_title)
        except Exception as exc:
            with self.ledger.transaction() as (_, append):
                append(audit.Event(type=audit.INSTANCES_TRANSFERRED, action=audit.Action.EXECUTE,
                                   outcome=audit.Outcome.MAJOR_FAILURE, actor=actor, objects=objects,
                                   detail=f"delivery to {name} failed: {exc}"))
            raise
        with self.ledger.transaction() as (_, append):
            append(audit.Event(type=audit.INSTANCES_TRANSFERRED, action=audit.Action.EXECUTE,
                               outcome=audit.Outcome.SUCCESS, actor=actor,
                               objects=dict(objects, answers=delivered.answers), detail=delivered.confirmed))
        return f"delivered to {name}: {delivered.confirmed}"

    def _infer(self, job: Job, files: list[Path], out: Path) -> str:
        previous = self.data.result_folder(job.supersedes) / SR_FILE if job.supersedes is not None else None
        return segment(job, files, out, self.models_dir, self.options, self.settings.outputs,
                       previous if previous is not None and previous.exists() else None)

    def run_once(self) -> bool:
        """Reap expired leases, then claim and run at most one job, renewing its lease meanwhile.

        A segment job whose series changed since it was queued (input sha256 differs) is marked
        SUPERSEDED unrun. Success records the result folder and queues a delivery per destination (the
        rule's, else `routing.default_destinations`). A failure is recorded as FAILED (retried after
        backoff) or DEAD (last attempt, or a non-retryable SegnodeError); it is not raised.

        Returns:
            False when no job was runnable, True when one was handled (whatever its outcome).

        Raises:
            Exception: a database error while reaping, claiming or recording (a claimed job's lease
                then expires and it is reaped); `run` logs it and carries on.
        """
        jobs = self.settings.jobs
        queue.reap(self.ledger)
        remote = jobs.executor == "celery"  # segmentations are remote workers' (segnode.jobs.dispatch)
        job = queue.claim(self.ledger.engine, self.owner, jobs.lease_seconds,
                          kinds=[JobKind.DELIVER] if remote else None)
        if job is None:
            return False
        if job.created_at:
            STAGE_SECONDS.labels("queue_wait").observe(max(0.0, seconds_since(job.created_at)))
        log.info("job %d: %s on series (attempt %d of %d)", job.id, job.model if job.kind == JobKind.SEGMENT
                 else f"delivery to {job.destination}", job.attempts, job.max_attempts)
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(job.id, stop), daemon=True)
        renewer.start()
        try:
            if job.kind == JobKind.DELIVER:
                queue.finish(self.ledger, job, self.owner, "", self._deliver(job))
                return True
            with self.ledger.engine.connect() as conn:
                series = completed_series(conn, job.series_uid, job.generation)
            if series.input_sha256 != job.input_sha256:
                queue.finish(self.ledger, job, self.owner, "", "the series changed before this job ran; the job "
                             "for its new version covers it", state=JobState.SUPERSEDED)
                return True
            out = self.data.result_folder(job.id)
            files = [self.data.path(i.path) for i in series.instances]
            detail = self.runner(job, files, out)
            targets = list(job.destinations) or self.settings.routing.default_destinations
            if not queue.finish(self.ledger, job, self.owner, self.data.relative(out), detail, deliver_to=targets,
                                delivery_attempts=jobs.delivery_attempts):
                log.warning("job %d finished after its lease was lost; another worker owns it now", job.id)
        except SegnodeError as exc:
            if exc.retryable:
                log.warning("job %d failed (%s); retryable", job.id, exc)
                state = queue.fail(self.ledger, job, self.owner, f"{type(exc).__name__}: {exc}", jobs)
            else:  # the input or the installation must change first: retrying would fail the same way
                log.warning("job %d cannot succeed as it is: %s", job.id, exc)
                reason = f"refused: {exc}" if isinstance(exc, SeriesError) else f"{type(exc).__name__}: {exc}"
                state = queue.fail(self.ledger, job, self.owner, reason, jobs, final=True)
            log.warning("job %d is now %s", job.id, state)
        except Exception as exc:  # not one of ours: a bug or an environment fault; retried, as it may pass
            log.exception("job %d failed", job.id)
            state = queue.fail(self.ledger, job, self.owner, f"{type(exc).__name__}: {exc}", jobs)
            log.warning("job %d is now %s", job.id, state)
        finally:
            stop.set()
            renewer.join()
        return True

    def _renew(self, job_id: int, stop: threading.Event) -> None:
        lease = self.settings.jobs.lease_seconds
        while not stop.wait(lease / 3):
            if not queue.renew(self.ledger.engine, job_id, self.owner, lease):
                log.warning("job %d: lease lost", job_id)
                return

    def run(self, stop: Callable[[], bool], idle_seconds: float = 0.5) -> None:
        """`run_once` until `stop()` is true, sleeping `idle_seconds` (s) when idle or after an error.
        A job under way is finished before `stop` is looked at again."""
        while not stop():
            try:
                busy = self.run_once()
            except Exception:
                log.exception("worker loop error; continuing")
                busy = False
            if not busy:
                time.sleep(idle_seconds)
