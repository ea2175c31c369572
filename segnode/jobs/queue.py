"""The persistent job queue: one job per series version and model version, claimed atomically by
any number of worker processes, retried with exponential backoff, dead after its last try, and
requeued when its worker stops renewing the lease. States and records: segnode.flow (JobState, Job).
"""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

from sqlalchemy import Connection, Engine, and_, func, select, update

from segnode.audit import events as audit
from segnode.audit.ledger import Append, Ledger
from segnode.config import JobsConfig
from segnode.db.models import JOBS
from segnode.flow import RUNNABLE, Job, JobKind, JobSpec, JobState, utc_now



def _actor(owner: str = "") -> dict[str, Any]:
    return {"component": "worker" if owner else "router", **({"worker": owner} if owner else {})}


def _event(job_id: int, what: str, outcome: audit.Outcome = audit.Outcome.SUCCESS, owner: str = "",
           **objects: Any) -> audit.Event:
    return audit.Event(type=audit.JOB_EVENT, action=audit.Action.EXECUTE if owner else audit.Action.CREATE,
                       outcome=outcome, actor=_actor(owner), objects={"job_id": job_id, **objects}, detail=what)


def enqueue(conn: Connection, append: Append, spec: JobSpec, max_attempts: int) -> tuple[int, bool]:
    """Queue `spec` in the caller's transaction, with its audit event.

    Returns:
        (job id, created): an existing job with the same idempotency key is returned, not repeated.
    """
    key = spec.key()
    found = conn.execute(select(JOBS.c.id).where(JOBS.c.idempotency_key == key)).scalar()
    if found is not None:
        return int(found), False
    previous = None if spec.kind == JobKind.DELIVER else conn.execute(select(func.max(JOBS.c.id)).where(
        JOBS.c.series_uid == spec.series_uid, JOBS.c.model == spec.model, JOBS.c.kind == JobKind.SEGMENT,
        JOBS.c.state == JobState.SUCCEEDED)).scalar()
    stamp = utc_now()
    inserted = conn.execute(JOBS.insert().values(
        kind=str(spec.kind), destination=spec.destination, parent_job=spec.parent_job,
        idempotency_key=key, series_uid=spec.series_uid, study_uid=spec.study_uid, generation=spec.generation,
        model=spec.model, model_version=spec.model_version, weights_sha256=spec.weights_sha256,
        input_sha256=spec.input_sha256, instances=spec.instances, rule=spec.rule, ruleset_sha256=spec.ruleset_sha256,
        destinations=json.dumps(list(spec.destinations)), priority=spec.priority, state=JobState.QUEUED.value, attempts=0,
        max_attempts=max_attempts, next_run_at=0.0, lease_owner="", lease_expires_at=0.0, last_error="", output="",
        supersedes=previous, assumed_spacing_mm=spec.assumed_spacing_mm, created_at=stamp, updated_at=stamp))
    assert inserted.inserted_primary_key is not None
    job_id = inserted.inserted_primary_key[0]
    detail = (f"queued: deliver job {spec.parent_job}'s results to {spec.destination}" if spec.kind == JobKind.DELIVER else
              f"queued: {spec.model} {spec.model_version} on {spec.instances} instance(s) (rule {spec.rule})")
    if previous is not None:
        detail += f"; its result will supersede job {previous}'s"
    if spec.assumed_spacing_mm is not None:
        detail += (f"; images without a pixel spacing will be read at an ASSUMED {spec.assumed_spacing_mm:g} mm "
                   f"(rule {spec.rule})")
    objects: dict[str, Any] = dict(series_uid=spec.series_uid, study_uid=spec.study_uid, model=spec.model,
                                   model_version=spec.model_version, weights_sha256=spec.weights_sha256,
                                   input_sha256=spec.input_sha256, ruleset_sha256=spec.ruleset_sha256, supersedes=previous)
    if spec.assumed_spacing_mm is not None:
        objects["assumed_spacing_mm"] = spec.assumed_spacing_mm
    append(_event(int(job_id), detail, **objects))
    return int(job_id), True


def reap(ledger: Ledger, now: float | None = None) -> list[tuple[int, JobState]]:
    """Running jobs whose lease expired (their worker died or hung): requeued at once, or dead after
    the last try; each change audited.

    Args:
        ledger: the database and the audit trail.
        now: epoch seconds to compare leases with (tests); default the clock.

    Returns:
        (job id, new state) for every job reaped.
    """
    now = time.time() if now is None else now
    changed = []
    with ledger.transaction() as (conn, append):
        rows = conn.execute(select(JOBS.c.id, JOBS.c.attempts, JOBS.c.max_attempts, JOBS.c.lease_owner).where(
            JOBS.c.state == JobState.RUNNING, JOBS.c.lease_expires_at < now)).all()
        for job_id, attempts, max_attempts, owner in rows:
            state = JobState.QUEUED if attempts < max_attempts else JobState.DEAD
            error = f"worker {owner} stopped renewing its lease (attempt {attempts} of {max_attempts})"
            conn.execute(update(JOBS).where(JOBS.c.id == job_id, JOBS.c.state == JobState.RUNNING).values(
                state=state.value, lease_owner="", last_error=error, next_run_at=now, updated_at=utc_now()))
            append(_event(job_id, f"{'requeued' if state == JobState.QUEUED else 'dead'}: {error}",
                          audit.Outcome.MINOR_FAILURE if state == JobState.QUEUED else audit.Outcome.SERIOUS_FAILURE))
            changed.append((job_id, state))
    return changed


def claim(engine: Engine, owner: str, lease_seconds: float, now: float | None = None,
          kinds: Sequence[JobKind] | None = None, job_id: int | None = None) -> Job | None:
    """Atomically take the most urgent runnable job (one UPDATE ... RETURNING: two workers can never
    both get it, on SQLite or on PostgreSQL).

    Most urgent: highest priority, then oldest id, among QUEUED or FAILED jobs whose `next_run_at`
    has passed. The claim increments `attempts` and is not audited (the outcome is).

    Args:
        engine: the database.
        owner: the worker's id ('host:pid'), which must match to renew, finish or fail.
        lease_seconds: how long (s) the job is the worker's without a renewal.
        now: epoch seconds (tests); default the clock.
        kinds: only jobs of these kinds (the node's own workers take only deliveries when segmentations go
            to remote workers); None: any.
        job_id: only this job (a remote worker claims the job its broker message names).

    Returns:
        The job as claimed (state RUNNING), or None when nothing (or not that job) is runnable.
    """
    now = time.time() if now is None else now
    runnable = and_(JOBS.c.state.in_([s.value for s in RUNNABLE]), JOBS.c.next_run_at <= now)
    if kinds is not None:
        runnable = and_(runnable, JOBS.c.kind.in_([k.value for k in kinds]))
    if job_id is not None:
        runnable = and_(runnable, JOBS.c.id == job_id)
    pick = select(JOBS.c.id).where(runnable).order_by(JOBS.c.priority.desc(), JOBS.c.id).limit(1)
    if engine.dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    stmt = (update(JOBS).where(JOBS.c.id == pick.scalar_subquery(), runnable)
            .values(state=JobState.RUNNING.value, lease_owner=owner, lease_expires_at=now + lease_seconds,
                    attempts=JOBS.c.attempts + 1, updated_at=utc_now())
            .returning(*JOBS.c))
    with engine.begin() as conn:
        row = conn.execute(stmt).mappings().first()
    return Job.from_row(dict(row)) if row is not None else None


def renew(engine: Engine, job_id: int, owner: str, lease_seconds: float) -> bool:
    """Extend the lease to now + `lease_seconds` (s).

    Returns:
        False when the job is no longer this worker's (reaped, or no longer RUNNING).
    """
    with engine.begin() as conn:
        result = conn.execute(update(JOBS).where(JOBS.c.id == job_id, JOBS.c.state == JobState.RUNNING,
                                                 JOBS.c.lease_owner == owner)
                              .values(lease_expires_at=time.time() + lease_seconds))
    return result.rowcount == 1


def finish(ledger: Ledger, job: Job, owner: str, output: str, detail: str,
           state: JobState = JobState.SUCCEEDED, deliver_to: Sequence[str] = (), delivery_attempts: int = 1) -> bool:
    """Record success (or superseded) and queue the deliveries of its results, in one transaction.

    Args:
        output: the result folder, relative to the data directory ("" for none).
        detail: what the audit event says about the result.
        deliver_to: destinations to queue a delivery job for.
    Returns:
        False when the lease was lost meanwhile (another worker owns the job); nothing is recorded then.
    """
    with ledger.transaction() as (conn, append):
        result = conn.execute(update(JOBS).where(JOBS.c.id == job.id, JOBS.c.state == JobState.RUNNING,
                                                 JOBS.c.lease_owner == owner)
                              .values(state=state.value, output=output, lease_owner="", last_error="",
                                      updated_at=utc_now()))
        if result.rowcount != 1:
            return False
        append(_event(job.id, f"{state}: {detail}", owner=owner, series_uid=job.series_uid, model=job.model,
                      output=output))
        for destination in deliver_to:
            enqueue(conn, append, job.delivery(destination), delivery_attempts)
    return True


def retry_delay(attempt: int, policy: JobsConfig) -> float:
    """Seconds to wait after try `attempt` (1-based): `backoff_seconds` doubling with each try, capped."""
    return min(policy.backoff_max_seconds, policy.backoff_seconds * 2 ** (attempt - 1))


def fail(ledger: Ledger, job: Job, owner: str, error: str, policy: JobsConfig,
         final: bool = False) -> JobState | None:
    """Record a failure: FAILED (retried after `retry_delay`) or DEAD after the last try, or at once when
    `final` (retrying cannot help).

    Returns:
        The new state; None when the lease was lost meanwhile (nothing recorded).
    """
    state = JobState.FAILED if job.attempts < job.max_attempts and not final else JobState.DEAD
    delay = retry_delay(job.attempts, policy)
    with ledger.transaction() as (conn, append):
        result = conn.execute(update(JOBS).where(JOBS.c.id == job.id, JOBS.c.state == JobState.RUNNING,
                                                 JOBS.c.lease_owner == owner)
                              .values(state=state.value, lease_owner="", last_error=error[:4000],
                                      next_run_at=time.time() + delay, updated_at=utc_now()))
        if result.rowcount != 1:
            return None
        what = (f"failed (attempt {job.attempts} of {job.max_attempts}, retry in {delay:.0f} s): {error}"
                if state == JobState.FAILED else f"dead after {job.attempts} attempt(s): {error}")
        append(_event(job.id, what, audit.Outcome.MINOR_FAILURE if state == JobState.FAILED
                      else audit.Outcome.SERIOUS_FAILURE, owner=owner, series_uid=job.series_uid, model=job.model))
    return state


def retry(ledger: Ledger, job_id: int, who: str = "operator") -> bool:
    """Queue a failed or dead job again, with a fresh set of tries (attempts reset, runnable at once).

    Args:
        ledger: the database and the audit trail.
        job_id: the job's id.
        who: recorded as the audit event's user.

    Returns:
        False when there is no such job or it is neither FAILED nor DEAD (nothing recorded).
    """
    with ledger.transaction() as (conn, append):
        result = conn.execute(update(JOBS).where(JOBS.c.id == job_id,
                                                 JOBS.c.state.in_((JobState.FAILED.value, JobState.DEAD.value)))
                              .values(state=JobState.QUEUED.value, attempts=0, next_run_at=0.0, updated_at=utc_now()))
        if result.rowcount != 1:
            return False
        append(audit.Event(type=audit.JOB_EVENT, action=audit.Action.UPDATE, outcome=audit.Outcome.SUCCESS,
                           actor={"component": "cli", "user": who}, objects={"job_id": job_id},
                           detail="queued again by request"))
    return True


def list_jobs(conn: Connection, state: str | None = None, series_uid: str | None = None,
              study_uid: str | None = None, kind: str | None = None) -> list[Job]:
    """Jobs, oldest first, optionally of one state, series, study or kind.

    Args:
        conn: a connection.
        state: a JobState value ("dead", ...); an unknown one matches nothing. None or "": any.
        kind: a JobKind value ("segment", "deliver"); None or "": any.
        series_uid: Series Instance UID; None or "": any.
        study_uid: Study Instance UID; None or "": any.

    Returns:
        The matching rows as Job records.
    """
    stmt = select(JOBS).order_by(JOBS.c.id)
    if state:
        stmt = stmt.where(JOBS.c.state == state)
    if series_uid:
        stmt = stmt.where(JOBS.c.series_uid == series_uid)
    if study_uid:
        stmt = stmt.where(JOBS.c.study_uid == study_uid)
    if kind:
        stmt = stmt.where(JOBS.c.kind == kind)
    return [Job.from_row(dict(r)) for r in conn.execute(stmt).mappings()]


def job_output(conn: Connection, job_id: int) -> str:
    """The result folder of a job, relative to the data directory.

    Returns:
        e.g. 'results/12'; "" when the job is unknown or has no output (not succeeded).
    """
    return str(conn.execute(select(JOBS.c.output).where(JOBS.c.id == job_id)).scalar() or "")


def supersede_stale(conn: Connection, append: Append, series_uid: str, keep_generation: int) -> int:
    """Queued or failed jobs of older generations of a series: their input is gone, a newer job covers it.

    Marks them SUPERSEDED in the caller's transaction, deliveries of older results included, each with its
    audit event (a job's story must not stop at "queued"). RUNNING jobs are not touched: a segment job
    checks its input hash only before it runs, so one already running finishes on the input it read.

    Args:
        conn: the routing transaction's connection; append: its audit appender.
        series_uid: Series Instance UID.
        keep_generation: the new generation; jobs of lower ones are superseded.

    Returns:
        How many jobs were superseded.
    """
    stale = and_(JOBS.c.series_uid == series_uid, JOBS.c.generation < keep_generation,
                 JOBS.c.state.in_([s.value for s in RUNNABLE]))
    ids = conn.execute(select(JOBS.c.id).where(stale)).scalars().all()
    reason = "the series changed before this job ran"
    for job_id in ids:
        conn.execute(update(JOBS).where(JOBS.c.id == job_id, stale)
                     .values(state=JobState.SUPERSEDED.value, last_error=reason, updated_at=utc_now()))
        append(_event(job_id, f"superseded: {reason}; the job for its new version covers it",
                      series_uid=series_uid, generation=keep_generation))
    return len(ids)


def get_job(conn: Connection, job_id: int) -> Job | None:
    """The job with this id, or None."""
    row = conn.execute(select(JOBS).where(JOBS.c.id == job_id)).mappings().first()
    return Job.from_row(dict(row)) if row is not None else None
