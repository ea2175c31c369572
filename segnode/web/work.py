"""The node as the task manager of remote workers (`segnode worker`): claim a segment job, keep its lease,
return its results or its failure. Behind the token like the rest of the API.

A worker learns of a job from the broker (segnode.jobs.dispatch) and then:

    POST /api/work/jobs/{id}/claim   {"worker": name}  -> 200 the job, its instances (SOP UID + sha256, to
                                     retrieve over WADO-RS), the output settings; 409 when it is not
                                     runnable now (taken, done, superseded, not due); 404 unknown
    POST /api/work/jobs/{id}/renew   {"worker": name}  -> 204; 409 when the lease was lost
    GET  /api/work/jobs/{id}/previous-sr?worker=name   -> the SR of the result this job supersedes
    PUT  /api/work/jobs/{id}/result?worker=name        application/x-tar of the result folder, with
                                     detail.txt (what the audit says) -> 200; 409 lease lost or already
                                     done; 413 larger than jobs.max_result_mb; 400 not a result
    POST /api/work/jobs/{id}/fail    {"worker", "error", "retryable"} -> 200 {"state"}; 409 lease lost

The shape follows IHE AIW-I's task performer (claim, retrieve, store, complete) over the node's own queue
rather than UPS-RS: the queue, its leases and its audit already are the workitem list, and a job claimed
twice, or a result returned twice, is refused by the same atomic updates the node's own workers use.
The results are written under DATA_DIR/tmp, fsynced, and moved into results/<id> in the transaction
that marks the job succeeded and queues its deliveries; nothing a worker sends names a path.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tarfile
import threading
from pathlib import Path
from typing import Any, Callable

import pydicom
from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from segnode.audit.ledger import Ledger
from segnode.config import Settings
from segnode.datadir import DETAIL_FILE, RECORD_FILE, SEG_FILE, SR_FILE, fsync_dir, result_files
from segnode.db.queries import completed_series
from segnode.flow import WORKER_NAME, Job, JobKind, JobState
from segnode.jobs import queue
from segnode.logs import printable

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_FILES = 1000


class WorkerRequest(BaseModel):
    worker: str = Field(pattern=WORKER_NAME)


class FailRequest(WorkerRequest):
    error: str = Field(max_length=4000)
    retryable: bool = True


def _check_worker(worker: str) -> str:
    if not re.match(WORKER_NAME, worker):
        raise HTTPException(400, "worker: 1 to 100 printable ASCII characters without spaces")
    return worker


def unpack_result(archive: Path, folder: Path, limit_bytes: int, free_floor_bytes: int) -> str:
    """Extract a returned result (tar of plain files with simple names) into `folder`, fsynced.

    Members are read one at a time (an archive of a million headers is refused at the 1001st, not read whole);
    sparse members are refused (10 KB could otherwise expand to the whole size limit on disk).

    Returns:
        The detail the worker wrote (detail.txt), for the audit event.

    Raises:
        HTTPException: 400 for anything else than plain, distinct, non-sparse files with simple names, or a
            result without its record or DICOM files, or a record that names anything but plain file names;
            413 when it unpacks to more than `limit_bytes`; 507 when it would leave the disk under the floor.
    """
    folder.mkdir(parents=True)
    detail = ""
    total = 0
    seen: set[str] = set()
    try:
        with tarfile.open(archive, mode="r:") as tar:
            while (member := tar.next()) is not None:
                if len(seen) >= MAX_FILES:
                    raise HTTPException(400, f"a result holds at most {MAX_FILES} files")
                if not member.isfile() or member.issparse() or not _NAME.match(member.name) or member.name in seen:
                    raise HTTPException(400, f"a result holds distinct plain files with simple names only, not "
                                             f"{printable(member.name, 80)!r}")
                seen.add(member.name)
                total += member.size
                if total > limit_bytes:
                    raise HTTPException(413, f"the result unpacks to more than {limit_bytes // 2**20} MB "
                                             "(jobs.max_result_mb)")
                if shutil.disk_usage(folder).free - member.size < free_floor_bytes:
                    raise HTTPException(507, "the node's disk is too full to take this result now "
                                             "(storage.free_space_floor_mb); it is taken once there is room")
                source = tar.extractfile(member)
                assert source is not None
                if member.name == DETAIL_FILE:
                    detail = source.read(8192).decode("utf-8", "replace")
                    continue
                with open(folder / member.name, "xb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
    except tarfile.TarError as exc:
        raise HTTPException(400, f"the result is not a tar archive: {exc}") from exc
    if not (folder / RECORD_FILE).is_file():
        raise HTTPException(400, f"the result has no {RECORD_FILE}")
    try:
        _, missing = result_files(folder)
    except ValueError as exc:
        raise HTTPException(400, f"the result's {RECORD_FILE} cannot be used: {exc}") from exc
    if missing:
        raise HTTPException(400, f"the result lacks {', '.join(Path(m).name for m in missing)}")
    fsync_dir(folder)
    return printable(detail, 2000)


SEG_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")  # Segmentation, Label Map Seg.
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
SC_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


def verify_result(folder: Path, study_uid: str, series_uid: str, instance_uids: set[str], patient_id: str) -> None:
    """A returned result must be about the job's own input before the node keeps or delivers it: every DICOM
    file of it is of the class its name says (seg.dcm a Segmentation, sr.dcm an SR, contour images Secondary
    Capture), in the input's study and of its patient, and the SEG references the input series and only its
    instances. A token holder could otherwise have another patient's result (or anything) sent to the PACS.

    Raises:
        HTTPException: 400 naming the first file and what is wrong with it.
    """
    files, _ = result_files(folder)
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - whatever it is, it is not a DICOM file we can check
            raise HTTPException(400, f"{path.name} is not a DICOM file: {printable(str(exc), 200)}") from exc
        sop_class = str(ds.get("SOPClassUID", ""))
        expected = (SEG_CLASSES if path.name == SEG_FILE else (SR_CLASS_PREFIX,) if path.name == SR_FILE
                    else (SC_CLASS_PREFIX,))
        if not sop_class.startswith(expected):
            raise HTTPException(400, f"{path.name} is of SOP class {printable(sop_class, 64)}, not what its name says")
        if str(ds.get("StudyInstanceUID", "")) != study_uid or str(ds.get("PatientID", "")) != patient_id:
            raise HTTPException(400, f"{path.name} is not of the job's study and patient")
        if path.name == SEG_FILE:
            referenced = [item for item in ds.get("ReferencedSeriesSequence", [])]
            if [str(item.get("SeriesInstanceUID", "")) for item in referenced] != [series_uid]:
                raise HTTPException(400, "seg.dcm does not reference the job's series (and only it)")
            sops = {str(i.get("ReferencedSOPInstanceUID", "")) for item in referenced
                    for i in item.get("ReferencedInstanceSequence", [])}
            if not sops or not sops <= instance_uids:
                raise HTTPException(400, "seg.dcm references instances that are not the job's input")


def work_routes(settings: Settings, ledger: Ledger, authorize: Callable[..., str]) -> APIRouter:
    """The routes remote workers use (see the module's docstring).

    Args:
        settings: `jobs` (lease, retries, max_result_mb, delivery attempts), `routing.default_destinations`,
            `outputs` (sent to the worker so its SEG and SR are what the node's own workers would write).
        ledger: the database (queue, index) and the audit trail.
        authorize: the app's token check.
    """
    router = APIRouter()
    data, jobs = settings.data, settings.jobs

    def _job(job_id: int) -> Job:
        if not 0 < job_id < 2**62:
            raise HTTPException(404, f"no segment job {job_id}")
        with ledger.engine.connect() as conn:
            job = queue.get_job(conn, job_id)
        if job is None or job.kind != JobKind.SEGMENT:
            raise HTTPException(404, f"no segment job {job_id}")
        return job

    def _owned(job_id: int, worker: str) -> Job:
        job = _job(job_id)
        if job.state != JobState.RUNNING or job.lease_owner != worker:
            raise HTTPException(409, f"job {job_id} is {job.state}" + (f", leased to {job.lease_owner}"
                                                                      if job.lease_owner else "")
                                + f"; not {worker}'s: drop this work")
        return job

    @router.post("/api/work/jobs/{job_id}/claim")
    def claim(request: Request, job_id: int, body: WorkerRequest) -> dict[str, Any]:
        """Take a segment job for `worker` (the lease is `jobs.lease_seconds`; renew it a third of the way)."""
        authorize(request)
        _job(job_id)  # 404 for what is not a segment job
        job = queue.claim(ledger.engine, body.worker, jobs.lease_seconds, kinds=[JobKind.SEGMENT], job_id=job_id)
        if job is None:
            now = _job(job_id)
            raise HTTPException(409, f"job {job_id} is {now.state}" + (
                f" (leased to {now.lease_owner})" if now.lease_owner else "") + ": not runnable now")
        with ledger.engine.connect() as conn:
            series = completed_series(conn, job.series_uid, job.generation)
        if series.input_sha256 != job.input_sha256:
            queue.finish(ledger, job, body.worker, "", "the series changed before this job ran; the job for its "
                         "new version covers it", state=JobState.SUPERSEDED)
            raise HTTPException(409, f"job {job_id} is superseded: the series changed")
        previous = data.result_folder(job.supersedes) / SR_FILE if job.supersedes is not None else None
        return {"job": job.as_dict(), "lease_seconds": jobs.lease_seconds, "study_uid": series.study_uid,
                "series_uid": series.series_uid,
                "instances": [{"sop_instance_uid": i.sop_instance_uid, "sha256": i.sha256} for i in series.instances],
                "outputs": settings.outputs.model_dump(mode="json"),
                "previous_sr": previous is not None and previous.is_file()}

    @router.post("/api/work/jobs/{job_id}/renew", status_code=204)
    def renew(request: Request, job_id: int, body: WorkerRequest) -> Response:
        authorize(request)
        if not queue.renew(ledger.engine, job_id, body.worker, jobs.lease_seconds):
            _owned(job_id, body.worker)  # says why (409)
        return Response(status_code=204)

    @router.get("/api/work/jobs/{job_id}/previous-sr")
    def previous_sr(request: Request, job_id: int, worker: str) -> FileResponse:
        authorize(request)
        job = _owned(job_id, _check_worker(worker))
        path = data.result_folder(job.supersedes) / SR_FILE if job.supersedes is not None else None
        if path is None or not path.is_file():
            raise HTTPException(404, f"job {job_id} supersedes no result with an SR")
        return FileResponse(path, media_type="application/dicom")

    @router.put("/api/work/jobs/{job_id}/result")
    async def result(request: Request, job_id: int, worker: str) -> JSONResponse:
        await run_in_threadpool(authorize, request)
        _check_worker(worker)
        job = await run_in_threadpool(_job, job_id)
        if job.state == JobState.SUCCEEDED:  # a retried upload whose answer was lost: done, say so
            return JSONResponse({"state": "succeeded", "output": job.output, "already": True})
        job = await run_in_threadpool(_owned, job_id, worker)
        with commit_lock:
            if job_id in uploading:
                raise HTTPException(409, f"a result for job {job_id} is already arriving")
            uploading.add(job_id)
        limit = jobs.max_result_mb * 2**20
        token = secrets.token_hex(8)
        archive = data.tmp / f"result-{job_id}-{token}.tar"
        staged = data.tmp / f"result-{job_id}-{token}"
        try:
            size = 0
            with open(archive, "xb") as out:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise HTTPException(413, f"a result is at most {jobs.max_result_mb} MB (jobs.max_result_mb)")
                    if size % (64 << 20) < len(chunk) and shutil.disk_usage(data.tmp).free < floor:
                        raise HTTPException(507, "the node's disk is too full to take this result now "
                                                 "(storage.free_space_floor_mb); it is taken once there is room")
                    out.write(chunk)
            return await run_in_threadpool(_commit, job, worker, archive, staged, limit)
        finally:
            archive.unlink(missing_ok=True)
            shutil.rmtree(staged, ignore_errors=True)
            with commit_lock:
                uploading.discard(job_id)

    commit_lock = threading.Lock()  # one result placed at a time: a second upload sees the first's outcome
    uploading: set[int] = set()  # jobs whose result is arriving: one upload per job at a time
    floor = settings.storage.free_space_floor_mb * 2**20

    def _commit(job: Job, worker: str, archive: Path, staged: Path, limit: int) -> JSONResponse:
        detail = unpack_result(archive, staged, limit, floor)
        with ledger.engine.connect() as conn:
            series = completed_series(conn, job.series_uid, job.generation)
        first = data.path(series.instances[0].path) if series.instances else None
        patient = (str(pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["PatientID"])
                       .get("PatientID", "")) if first is not None else "")
        verify_result(staged, job.study_uid, job.series_uid, {i.sop_instance_uid for i in series.instances}, patient)
        with commit_lock:
            current = _job(job.id)
            if current.state == JobState.SUCCEEDED:
                return JSONResponse({"state": "succeeded", "output": current.output, "already": True})
            _owned(job.id, worker)
            return _place(job, worker, staged, detail)

    def _place(job: Job, worker: str, staged: Path, detail: str) -> JSONResponse:
        final = data.result_folder(job.id)
        shutil.rmtree(final, ignore_errors=True)  # an earlier attempt's folder, never accepted
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staged, final)
        fsync_dir(final.parent)
        targets = list(job.destinations) or settings.routing.default_destinations
        if not queue.finish(ledger, job, worker, data.relative(final), detail or f"{job.model} result from {worker}",
                            deliver_to=targets, delivery_attempts=jobs.delivery_attempts):
            shutil.rmtree(final, ignore_errors=True)
            raise HTTPException(409, f"job {job.id}: the lease was lost before the result arrived; drop this work")
        return JSONResponse({"state": "succeeded", "output": data.relative(final)})

    @router.post("/api/work/jobs/{job_id}/fail")
    def fail(request: Request, job_id: int, body: FailRequest) -> dict[str, Any]:
        """Record the worker's failure: retried after the backoff, or dead (last try, or not retryable)."""
        authorize(request)
        job = _owned(job_id, body.worker)
        state = queue.fail(ledger, job, body.worker, printable(body.error, 4000), jobs, final=not body.retryable)
        if state is None:
            raise HTTPException(409, f"job {job_id}: the lease was lost; drop this work")
        return {"state": str(state)}

    return router
