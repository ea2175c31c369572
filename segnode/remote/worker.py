"""`segnode worker`: a GPU (or CPU) host that runs segment jobs without the node's file system.

It consumes job ids from the broker (segnode.jobs.broker), claims each job from the node over HTTP
(segnode.web.work), retrieves the series over WADO-RS and checks every instance against the sha256 the node
indexed, runs the same code as the node's own workers (segnode.jobs.worker.segment), and returns the result
folder as a tar. The node stores, audits and delivers it. The job's lease is renewed while it runs; a worker
that dies stops renewing, the node requeues the job, and RabbitMQ redelivers the unacknowledged message.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import httpx

from segnode.config import OutputsConfig
from segnode.datadir import DETAIL_FILE
from segnode.errors import SegnodeError
from segnode.flow import Job
from segnode.inference.engine import EngineOptions, engine_for
from segnode.jobs.worker import segment
from segnode.models.registry import list_models, read_manifest
from segnode.remote.wado_client import retrieve_series

log = logging.getLogger(__name__)


class NodeUnreachable(SegnodeError):
    """The node did not answer (or refused the token) after the retries: nothing was run."""

    retryable = True


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """A remote worker's settings (the CLI's flags).

    Attributes:
        node_url: the node's HTTP root, e.g. https://segnode.hospital.org:8080.
        token: the node's bearer token (`http.token`), or None when it has none.
        models_dir: the model folders installed on this host (the versions jobs ask for must be there).
        device: inference device (auto, cpu, cuda, cuda:N).
        work_dir: where series and results are kept while a job runs (deleted after); None: the system's.
        name: this worker's name in leases and audit events (default host:pid).
        timeout: s per HTTP request to the node.
        retries: tries of a request the node does not answer before giving up on the job (delays 1, 2, 4 ... s).
    """

    node_url: str
    token: str | None
    models_dir: Path
    device: str = "auto"
    work_dir: Path | None = None
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    timeout: float = 60.0
    retries: int = 6


class RemoteWorker:
    """Runs segment jobs named by id (see the module's docstring)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
        self.client = httpx.Client(base_url=settings.node_url.rstrip("/"), headers=headers, timeout=settings.timeout)
        self.options = EngineOptions(device=settings.device)
        if settings.work_dir is not None:
            settings.work_dir.mkdir(parents=True, exist_ok=True)

    def models(self) -> list[str]:
        """The models installed here (folder names)."""
        return [folder.name for folder in list_models(self.settings.models_dir)]

    def warm(self, models: Sequence[str]) -> None:
        """Load each model once before the first job (as the node's workers do)."""
        for name in models:
            try:
                seconds = engine_for(self.settings.models_dir / name, self.options).warm_up()
            except Exception as exc:  # noqa: BLE001 - its jobs will say why
                log.warning("model %s could not be loaded in advance (%s); its jobs will say why", name, exc)
            else:
                log.info("model %s warm (one batch in %.2f s)", name, seconds)

    # -- talking to the node ----------------------------------------------------------------------
    def _call(self, method: str, path: str, body: Path | None = None, **kwargs: Any) -> httpx.Response:
        """One request, retried while the node does not answer or answers 5xx; 2xx, 404 and 409 returned.
        `body`: a file sent as the request's content, read afresh on every try.

        Raises:
            NodeUnreachable: still no answer after `retries` tries, or the token refused (401/403), or
                another 4xx (what the node said is in the message).
        """
        delay, last = 1.0, ""
        for attempt in range(1, self.settings.retries + 1):
            try:
                if body is None:
                    rsp = self.client.request(method, path, **kwargs)
                else:
                    with open(body, "rb") as content:
                        rsp = self.client.request(method, path, content=content, **kwargs)
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if rsp.status_code < 300 or rsp.status_code in (404, 409):
                    return rsp
                if rsp.status_code in (401, 403):
                    raise NodeUnreachable(f"the node at {self.settings.node_url} refused this worker "
                                          f"({rsp.status_code}): check --token")
                if rsp.status_code < 500:
                    raise NodeUnreachable(f"the node answered {method} {path} with {rsp.status_code}: "
                                          f"{rsp.text[:300]}")
                last = f"HTTP {rsp.status_code}: {rsp.text[:200]}"
            if attempt < self.settings.retries:
                log.info("node did not answer %s %s (%s); trying again in %.0f s", method, path, last, delay)
                time.sleep(delay)
                delay = min(30.0, delay * 2)
        raise NodeUnreachable(f"cannot reach the node at {self.settings.node_url} after {self.settings.retries} "
                              f"tries ({last}); check --node, the network and that the node runs")

    # -- one job ------------------------------------------------------------------------------------
    def check_node(self) -> None:
        """Whether the node answers and takes this worker's token (a claim of job 0: 404 when it does).

        Raises:
            NodeUnreachable: no answer after the retries, or the token refused (the message says which).
        """
        rsp = self._call("POST", "/api/work/jobs/0/claim", json={"worker": self.settings.name})
        if rsp.status_code != 404:
            raise NodeUnreachable(f"{self.settings.node_url} is not a segnode that takes remote workers "
                                  f"(HTTP {rsp.status_code} to a probe); check --node")

    def lacks(self, model: str, version: str, weights_sha256: str) -> str | None:
        """Why this worker cannot run jobs queued for this model version (None: it can). Checked before a claim:
        a worker left on another version during an upgrade must leave the job to others, not fail it."""
        try:
            manifest = read_manifest(self.settings.models_dir / model)
        except Exception as exc:  # noqa: BLE001 - missing or unreadable: this worker cannot run it
            return f"model {model} is not installed here ({type(exc).__name__}: {exc})"
        if (manifest.version, manifest.weights_sha256) != (version, weights_sha256):
            return (f"model {model} here is {manifest.version} (weights {manifest.weights_sha256[:12]}), the job "
                    f"wants {version} ({weights_sha256[:12]})")
        return None

    def run_job(self, job_id: int) -> str:
        """Claim job `job_id`, run it and return its result (or its failure) to the node.

        Returns:
            "succeeded", "failed" (the node has the reason), or "dropped" (not runnable now: another
            worker has it, it is done, superseded, or not due).

        Raises:
            NodeUnreachable: the node could not be reached to claim the job or to return its outcome; the
                job's lease, if it was claimed, expires and the node requeues it.
        """
        rsp = self._call("POST", f"/api/work/jobs/{job_id}/claim", json={"worker": self.settings.name})
        if rsp.status_code in (404, 409):
            log.info("job %d not taken: %s", job_id, rsp.json().get("detail", rsp.text)[:200])
            return "dropped"
        claim = rsp.json()
        job = Job.from_row(claim["job"])
        log.info("job %d: %s %s on %d instance(s) (attempt %d of %d)", job.id, job.model, job.model_version,
                 len(claim["instances"]), job.attempts, job.max_attempts)
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(job.id, float(claim["lease_seconds"]), stop), daemon=True)
        renewer.start()
        try:
            with tempfile.TemporaryDirectory(prefix=f"segnode-job-{job.id}-", dir=self.settings.work_dir) as tmp:
                try:
                    archive = self._segment(job, claim, Path(tmp))
                except NodeUnreachable:
                    raise
                except SegnodeError as exc:
                    return self._fail(job, f"{type(exc).__name__}: {exc}", exc.retryable)
                except Exception as exc:  # noqa: BLE001 - a bug or the environment: may pass, tried again
                    log.exception("job %d failed", job.id)
                    return self._fail(job, f"{type(exc).__name__}: {exc}", True)
                sent = time.perf_counter()
                answer = self._call("PUT", f"/api/work/jobs/{job.id}/result", body=archive,
                                    params={"worker": self.settings.name},
                                    headers={"Content-Type": "application/x-tar"})
                returned = time.perf_counter() - sent
        finally:
            stop.set()
            renewer.join()
        if answer.status_code == 409:
            log.warning("job %d: result not taken: %s", job.id, answer.json().get("detail", "")[:200])
            return "dropped"
        log.info("job %d succeeded: %s (returned in %.3f s)", job.id, answer.json().get("output", ""), returned)
        return "succeeded"

    def _segment(self, job: Job, claim: dict[str, Any], tmp: Path) -> Path:
        """Retrieve, segment, pack: the tar to return (its detail says how long retrieval took)."""
        instances = [(i["sop_instance_uid"], i["sha256"]) for i in claim["instances"]]
        start = time.perf_counter()
        files = retrieve_series(self.client, "", claim["study_uid"], claim["series_uid"], instances,
                                tmp / "series")
        previous = None
        if claim.get("previous_sr"):
            rsp = self._call("GET", f"/api/work/jobs/{job.id}/previous-sr", params={"worker": self.settings.name})
            if rsp.status_code == 200:
                previous = tmp / "previous-sr.dcm"
                previous.write_bytes(rsp.content)
        retrieved = time.perf_counter() - start
        out = tmp / "result"
        detail = segment(job, files, out, self.settings.models_dir, self.options,
                         OutputsConfig.model_validate(claim["outputs"]), previous)
        archive = tmp / "result.tar"
        with tarfile.open(archive, "w") as tar:
            for path in sorted(out.iterdir()):
                if path.is_file():
                    tar.add(path, arcname=path.name)
            text = f"{detail} (worker {self.settings.name}; retrieved in {retrieved:.3f} s)".encode()
            info = tarfile.TarInfo(DETAIL_FILE)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
        return archive

    def _fail(self, job: Job, error: str, retryable: bool) -> str:
        log.warning("job %d failed (%s): %s", job.id, "retryable" if retryable else "final", error[:300])
        self._call("POST", f"/api/work/jobs/{job.id}/fail",
                   json={"worker": self.settings.name, "error": error[:4000], "retryable": retryable})
        return "failed"

    def _renew(self, job_id: int, lease: float, stop: threading.Event) -> None:
        while not stop.wait(lease / 3):
            try:
                rsp = self.client.post(f"/api/work/jobs/{job_id}/renew", json={"worker": self.settings.name})
            except httpx.HTTPError as exc:
                log.warning("job %d: lease not renewed (%s); trying again", job_id, exc)
                continue
            if rsp.status_code == 409:
                log.warning("job %d: lease lost (%s)", job_id, rsp.json().get("detail", "")[:200])
                return


def consume(worker: RemoteWorker, broker_url: str, queues: Sequence[str], loglevel: str = "INFO") -> None:
    """Run a Celery worker (one job at a time, in this process) that hands each message's job id to
    `worker.run_job`, until SIGTERM or SIGINT. A message is acknowledged once its job's outcome is on the node,
    or it was not runnable; when the node cannot be reached it is acknowledged too (the node publishes the
    job again later: its queue is the record), after the worker said why in its log."""
    from segnode.jobs.broker import TASK, celery_app

    app = celery_app(broker_url)

    @app.task(name=TASK)  # type: ignore[untyped-decorator]
    def run(job_id: int, model: str = "", version: str = "", weights_sha256: str = "") -> str:
        if model:
            why = worker.lacks(model, version, weights_sha256)
            if why is not None:  # left queued on the node: published again for the other workers
                log.error("job %d left for other workers: %s; install it here or route it elsewhere "
                          "(jobs.queues, --queues)", job_id, why)
                return "lacking"
        try:
            return worker.run_job(int(job_id))
        except NodeUnreachable as exc:
            log.error("job %d not run: %s", job_id, exc)
        except Exception:  # noqa: BLE001 - the message is acknowledged; the node's lease brings the job back
            log.exception("job %d: the worker failed; the node requeues the job when its lease ends", job_id)
        return "not run"

    log.info("worker %s: queues %s, node %s, models %s", worker.settings.name, ", ".join(queues),
             worker.settings.node_url, ", ".join(worker.models()) or "none")
    app.Worker(queues=list(queues), pool="solo", concurrency=1, hostname=f"{worker.settings.name}@segnode",
               without_gossip=True, without_mingle=True, without_heartbeat=True, loglevel=loglevel,
               quiet=True).start()
