"""Segment jobs carried to remote workers by Celery (`jobs.executor: celery`).

The queue in the database stays the state of record; the dispatcher only tells workers that a job is
waiting. Every poll it publishes each runnable segment job (due, QUEUED or FAILED) that it has not
published recently, to the model's queue (segnode.jobs.broker.queue_for) with the rule's priority. A
job still runnable after its message was published is published again after a delay that doubles each
time (lease_seconds, 2x, 4x, ... at most an hour): a message lost with a broker that did not persist it,
or refused by a worker that could not reach the node, cannot strand a job, and a long backlog does not
fill the broker with copies. Copies are harmless: the worker's claim (segnode.web.work) takes a job once.
It also reaps expired leases (a remote worker that died), which requeues their jobs.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from sqlalchemy import and_, select

from segnode.audit.ledger import Ledger
from segnode.config import Settings
from segnode.db.models import JOBS
from segnode.flow import RUNNABLE, JobKind
from segnode.jobs import queue
from segnode.jobs.broker import TASK, celery_app, priority_for, queue_for

log = logging.getLogger(__name__)
MAX_REPUBLISH_DELAY = 3600.0
BROKER_CHECK_SECONDS = 10.0  # with nothing to publish, the broker is still checked this often (readiness)


@dataclass
class _Published:
    at: float
    delay: float


class Dispatcher:
    """Publishes runnable segment jobs to the broker from a thread (see the module's docstring).

    Args:
        settings: `jobs` (broker_url, queues, lease_seconds) and `routing.poll_seconds`.
        ledger: the database (the queue) and the audit trail (reaped leases are audited).
    """

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        jobs = settings.jobs
        assert jobs.broker_url is not None  # the settings refuse executor celery without one
        self.settings, self.ledger = settings, ledger
        self.app = celery_app(jobs.broker_url.get_secret_value())
        self.poll_seconds = settings.routing.poll_seconds
        self._published: dict[int, _Published] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self.broker_down_since: float | None = None
        self._checked = -BROKER_CHECK_SECONDS  # when the broker last took a message or a connection
        self.last_error = ""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def not_ready(self) -> str | None:
        """A readiness check: why the broker cannot be reached, or None."""
        if self.broker_down_since is None:
            return None
        return (f"the broker has not taken a message for {time.monotonic() - self.broker_down_since:.0f} s "
                f"({self.last_error}); segmentations wait in the queue until it does")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - the database or the broker: tried again next poll
                self._failed(exc)
            self._stop.wait(self.poll_seconds)

    def poll(self, now: float | None = None) -> int:
        """Reap expired leases, then publish what is due; returns how many messages were published.

        Raises:
            Exception: the database's or the broker's error (kombu's OperationalError when it is down).
        """
        queue.reap(self.ledger)
        now = time.time() if now is None else now
        due = and_(JOBS.c.kind == JobKind.SEGMENT.value, JOBS.c.state.in_([s.value for s in RUNNABLE]),
                   JOBS.c.next_run_at <= now)
        with self.ledger.engine.connect() as conn:
            rows = conn.execute(select(JOBS.c.id, JOBS.c.model, JOBS.c.model_version, JOBS.c.weights_sha256,
                                       JOBS.c.priority).where(due)
                                .order_by(JOBS.c.priority.desc(), JOBS.c.id)).all()
        runnable = {row.id for row in rows}
        for job_id in [j for j in self._published if j not in runnable]:  # claimed, done or dead: forget it
            del self._published[job_id]
        sent = 0
        clock = time.monotonic()
        lease = self.settings.jobs.lease_seconds
        for row in rows:
            seen = self._published.get(row.id)
            if seen is not None and clock - seen.at < seen.delay:
                continue
            self.app.send_task(TASK, args=[row.id, row.model, row.model_version, row.weights_sha256],
                               queue=queue_for(row.model, self.settings.jobs.queues),
                               priority=priority_for(row.priority), retry=False)
            delay = lease if seen is None else min(MAX_REPUBLISH_DELAY, seen.delay * 2)
            self._published[row.id] = _Published(clock, delay)
            if seen is not None:
                log.info("job %d still waits after %.0f s; published again", row.id, seen.delay)
            sent += 1
        if not sent and clock - self._checked >= BROKER_CHECK_SECONDS:  # idle: is the broker there at all?
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=5)
            self._checked = clock
        elif sent:
            self._checked = clock
        if self.broker_down_since is not None and (sent or not rows):
            log.warning("dispatcher working again after %.0f s", time.monotonic() - self.broker_down_since)
            self.broker_down_since = None
        return sent

    def _failed(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        if self.broker_down_since is None:
            self.broker_down_since = time.monotonic()
            log.warning("dispatcher: %s; segment jobs wait in the queue and are published once the broker and the "
                        "database answer (tried every %.1f s)", self.last_error, self.poll_seconds)
