"""The persistent job queue: one job per series version and model version, claimed atomically by
any number of worker processes, retried with exponential backoff, dead after its last try, and
requeued when its worker stops renewing the lease.

States: queued -> running -> succeeded | failed (will retry) -> ... -> dead; superseded when the
series changed before the job ran (a newer job covers the new input).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Sequence

from sqlalchemy import Connection, Engine, and_, func, select, update

from segnode.audit import trail as audit
from segnode.audit.ledger import Append, Ledger
from segnode.db.models import Job

JOBS = Job.__table__
STATES = ("queued", "running", "succeeded", "failed", "dead", "superseded")
RUNNABLE = ("queued", "failed")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def input_hash(instances: Sequence[tuple[str, str]]) -> str:
    """sha256 over the series' (SOP Instance UID, content sha256) pairs, in UID order."""
    digest = hashlib.sha256()
    for uid, sha in sorted(instances):
        digest.update(f"{uid}:{sha}\n".encode())
    return digest.hexdigest()


@dataclass
class JobSpec:
    series_uid: str
    study_uid: str
    generation: int
    model: str
    model_version: str
    weights_sha256: str
    input_sha256: str
    instances: int
    rule: str
    ruleset_sha256: str
    destinations: list[str]
    priority: int = 0
    kind: str = "segment"  # or "deliver"
    destination: str = ""  # deliver: where to
    parent_job: int | None = None  # deliver: the segment job whose results go there
    parent_key: str = ""  # deliver: that job's idempotency key

    @property
    def idempotency_key(self) -> str:
        """Same series, same model version and weights, same instances: the same job (and for a
        delivery: the same results to the same destination)."""
        if self.kind == "deliver":
            key = "\n".join(["deliver", self.parent_key, self.destination])
        else:
            key = "\n".join([self.series_uid, self.model, self.model_version, self.weights_sha256, self.input_sha256])
        return hashlib.sha256(key.encode()).hexdigest()

    def delivery(self, parent_job: int, parent_key: str, destination: str) -> "JobSpec":
        return replace(self, kind="deliver", destination=destination, parent_job=parent_job, parent_key=parent_key,
                       destinations=[destination])


def _actor(owner: str = "") -> dict[str, Any]:
    return {"component": "worker" if owner else "router", **({"worker": owner} if owner else {})}


def _event(job_id: int, what: str, outcome: int = audit.SUCCESS, owner: str = "", **objects: Any) -> audit.Event:
    return audit.Event(audit.JOB_EVENT, audit.ACTION_EXECUTE if owner else audit.ACTION_CREATE, outcome,
                       _actor(owner), {"job_id": job_id, **objects}, None, what)


def enqueue(conn: Connection, append: Append, spec: JobSpec, max_attempts: int) -> tuple[int, bool]:
    """(job id, created). An existing job with the same idempotency key is returned, not repeated."""
    key = spec.idempotency_key
    found = conn.execute(select(JOBS.c.id).where(JOBS.c.idempotency_key == key)).scalar()
    if found is not None:
        return int(found), False
    previous = None if spec.kind == "deliver" else conn.execute(select(func.max(JOBS.c.id)).where(
        JOBS.c.series_uid == spec.series_uid, JOBS.c.model == spec.model, JOBS.c.kind == "segment",
        JOBS.c.state == "succeeded")).scalar()
    stamp = now_iso()
    job_id = conn.execute(JOBS.insert().values(
        kind=spec.kind, destination=spec.destination, parent_job=spec.parent_job,
        idempotency_key=key, series_uid=spec.series_uid, study_uid=spec.study_uid, generation=spec.generation,
        model=spec.model, model_version=spec.model_version, weights_sha256=spec.weights_sha256,
        input_sha256=spec.input_sha256, instances=spec.instances, rule=spec.rule, ruleset_sha256=spec.ruleset_sha256,
        destinations=json.dumps(spec.destinations), priority=spec.priority, state="queued", attempts=0,
        max_attempts=max_attempts, next_run_at=0.0, lease_owner="", lease_expires_at=0.0, last_error="", output="",
        supersedes=previous, created_at=stamp, updated_at=stamp)).inserted_primary_key[0]
    detail = (f"queued: deliver job {spec.parent_job}'s results to {spec.destination}" if spec.kind == "deliver" else
              f"queued: {spec.model} {spec.model_version} on {spec.instances} instance(s) (rule {spec.rule})")
    if previous is not None:
        detail += f"; its result will supersede job {previous}'s"
    append(_event(int(job_id), detail, series_uid=spec.series_uid, study_uid=spec.study_uid, model=spec.model,
                  model_version=spec.model_version, weights_sha256=spec.weights_sha256, input_sha256=spec.input_sha256,
                  ruleset_sha256=spec.ruleset_sha256, supersedes=previous))
    return int(job_id), True


def reap(ledger: Ledger, now: float | None = None) -> list[tuple[int, str]]:
    """Running jobs whose lease expired (their worker died or hung): requeued, or dead after the last
    try. Returns (job id, new state)."""
    now = time.time() if now is None else now
    changed = []
    with ledger.transaction() as (conn, append):
        rows = conn.execute(select(JOBS.c.id, JOBS.c.attempts, JOBS.c.max_attempts, JOBS.c.lease_owner).where(
            JOBS.c.state == "running", JOBS.c.lease_expires_at < now)).all()
        for job_id, attempts, max_attempts, owner in rows:
            state = "queued" if attempts < max_attempts else "dead"
            error = f"worker {owner} stopped renewing its lease (attempt {attempts} of {max_attempts})"
            conn.execute(update(JOBS).where(JOBS.c.id == job_id, JOBS.c.state == "running").values(
                state=state, lease_owner="", last_error=error, next_run_at=now, updated_at=now_iso()))
            append(_event(job_id, f"{'requeued' if state == 'queued' else 'dead'}: {error}",
                          audit.MINOR_FAILURE if state == "queued" else audit.SERIOUS_FAILURE))
            changed.append((job_id, state))
    return changed


def claim(engine: Engine, owner: str, lease_seconds: float, now: float | None = None) -> dict[str, Any] | None:
    """Atomically take the most urgent runnable job (one UPDATE ... RETURNING: two workers can never
    both get it, on SQLite or on PostgreSQL)."""
    now = time.time() if now is None else now
    runnable = and_(JOBS.c.state.in_(RUNNABLE), JOBS.c.next_run_at <= now)
    pick = select(JOBS.c.id).where(runnable).order_by(JOBS.c.priority.desc(), JOBS.c.id).limit(1)
    if engine.dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    stmt = (update(JOBS).where(JOBS.c.id == pick.scalar_subquery(), runnable)
            .values(state="running", lease_owner=owner, lease_expires_at=now + lease_seconds,
                    attempts=JOBS.c.attempts + 1, updated_at=now_iso())
            .returning(*JOBS.c))
    with engine.begin() as conn:
        row = conn.execute(stmt).mappings().first()
    return dict(row) if row is not None else None


def renew(engine: Engine, job_id: int, owner: str, lease_seconds: float) -> bool:
    """Extend the lease; False when the job is no longer this worker's (it was reaped)."""
    with engine.begin() as conn:
        result = conn.execute(update(JOBS).where(JOBS.c.id == job_id, JOBS.c.state == "running",
                                                 JOBS.c.lease_owner == owner)
                              .values(lease_expires_at=time.time() + lease_seconds))
    return result.rowcount == 1


def spec_of(job: dict[str, Any]) -> JobSpec:
    return JobSpec(job["series_uid"], job["study_uid"], job["generation"], job["model"], job["model_version"],
                   job["weights_sha256"], job["input_sha256"], job["instances"], job["rule"], job["ruleset_sha256"],
                   json.loads(job["destinations"]), job["priority"], job["kind"], job["destination"],
                   job["parent_job"])


def finish(ledger: Ledger, job: dict[str, Any], owner: str, output: str, detail: str,
           state: str = "succeeded", deliver_to: Sequence[str] = ()) -> bool:
    """Record success (or superseded) and queue the deliveries of its results, in one transaction;
    False when the lease was lost meanwhile (another worker owns the job)."""
    with ledger.transaction() as (conn, append):
        result = conn.execute(update(JOBS).where(JOBS.c.id == job["id"], JOBS.c.state == "running",
                                                 JOBS.c.lease_owner == owner)
                              .values(state=state, output=output, lease_owner="", last_error="", updated_at=now_iso()))
        if result.rowcount != 1:
            return False
        append(_event(job["id"], f"{state}: {detail}", owner=owner, series_uid=job["series_uid"], model=job["model"],
                      output=output))
        for destination in deliver_to:
            enqueue(conn, append, spec_of(job).delivery(job["id"], job["idempotency_key"], destination),
                    int(job["max_attempts"]))
    return True


def fail(ledger: Ledger, job: dict[str, Any], owner: str, error: str, backoff_seconds: float,
         final: bool = False) -> str | None:
    """Record a failure: 'failed' (retried after backoff * 2**(attempt-1)) or 'dead' after the last try,
    or at once when `final` (retrying cannot help)."""
    attempts, max_attempts = int(job["attempts"]), int(job["max_attempts"])
    state = "failed" if attempts < max_attempts and not final else "dead"
    delay = backoff_seconds * 2 ** (attempts - 1)
    with ledger.transaction() as (conn, append):
        result = conn.execute(update(JOBS).where(JOBS.c.id == job["id"], JOBS.c.state == "running",
                                                 JOBS.c.lease_owner == owner)
                              .values(state=state, lease_owner="", last_error=error[:4000],
                                      next_run_at=time.time() + delay, updated_at=now_iso()))
        if result.rowcount != 1:
            return None
        what = (f"failed (attempt {attempts} of {max_attempts}, retry in {delay:.0f} s): {error}" if state == "failed"
                else f"dead after {attempts} attempt(s): {error}")
        append(_event(job["id"], what, audit.MINOR_FAILURE if state == "failed" else audit.SERIOUS_FAILURE,
                      owner=owner, series_uid=job["series_uid"], model=job["model"]))
    return state


def retry(ledger: Ledger, job_id: int, who: str = "operator") -> bool:
    """Queue a failed or dead job again, with a fresh set of tries."""
    with ledger.transaction() as (conn, append):
        result = conn.execute(update(JOBS).where(JOBS.c.id == job_id, JOBS.c.state.in_(("failed", "dead")))
                              .values(state="queued", attempts=0, next_run_at=0.0, updated_at=now_iso()))
        if result.rowcount != 1:
            return False
        append(audit.Event(audit.JOB_EVENT, audit.ACTION_UPDATE, audit.SUCCESS, {"component": "cli", "user": who},
                           {"job_id": job_id}, None, "queued again by request"))
    return True


def list_jobs(conn: Connection, state: str | None = None, series_uid: str | None = None) -> list[dict[str, Any]]:
    stmt = select(JOBS).order_by(JOBS.c.id)
    if state:
        stmt = stmt.where(JOBS.c.state == state)
    if series_uid:
        stmt = stmt.where(JOBS.c.series_uid == series_uid)
    return [dict(r) for r in conn.execute(stmt).mappings()]


def supersede_stale(conn: Connection, series_uid: str, keep_generation: int) -> int:
    """Queued or failed jobs of older generations of a series: their input is gone, a newer job covers it."""
    result = conn.execute(update(JOBS).where(JOBS.c.series_uid == series_uid, JOBS.c.generation < keep_generation,
                                             JOBS.c.state.in_(RUNNABLE))
                          .values(state="superseded", last_error="the series changed before this job ran",
                                  updated_at=now_iso()))
    return int(result.rowcount or 0)
