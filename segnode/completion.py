"""When is a series complete? When its study has been quiet for `stable_seconds` (every instance of
the study restarts the clock, so a slow series is not cut while its study is still arriving), at
once when a rule's expected instance count is reached, or when someone asks. Instances arriving
after completion reopen the series; it is routed again on the full series and the new results
supersede the old.

Completion, routing decision and jobs commit in one transaction: a crash leaves either an open
series (completed again at the next poll) or a routed one, never a completed series without jobs.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable

from sqlalchemy import func, select, update

from sqlalchemy import Connection

from segnode.audit import events as audit
from segnode.audit.ledger import Append, Ledger
from segnode.config import Settings
from segnode.db.models import INSTANCES, SERIES
from segnode.db.queries import completed_series
from segnode.flow import seconds_since
from segnode.metrics import STAGE_SECONDS
from segnode.errors import InputError
from segnode.flow import utc_iso, utc_now
from segnode.routing.router import facts, route
from segnode.routing.rules import Action, RuleSet, decide

log = logging.getLogger(__name__)
# an instance's received_at is taken just before its commit; commits finish within this (else the
# store has failed and said so), so re-reading this far back never misses a late commit
COMMIT_SLACK = timedelta(seconds=60)


def request_completion(ledger: Ledger, study_uid: str, who: str) -> int:
    """Mark every open series of a study for completion at the next poll.

    Series indexed but not yet seen by a poll are opened first (and completed ones that received
    instances since, reopened), so a request right after the last instance is not lost.

    Args:
        ledger: the database and the audit trail.
        study_uid: Study Instance UID.
        who: the component that asked ("cli", "http"), for the audit event.
    Returns:
        How many series were marked (0: unknown study, or nothing open).
    """
    with ledger.transaction() as (conn, append):
        _touch(conn, append, conn.execute(select(INSTANCES.c.series_uid).where(
            INSTANCES.c.study_uid == study_uid).distinct()).scalars().all())
        result = conn.execute(update(SERIES).where(SERIES.c.study_uid == study_uid, SERIES.c.state == "open")
                              .values(complete_requested=1))
        count = int(result.rowcount or 0)
        if count:
            append(audit.Event(type=audit.SERIES_COMPLETE, action=audit.Action.UPDATE, outcome=audit.Outcome.SUCCESS,
                               actor={"component": who}, objects={"study_uid": study_uid, "series": count},
                               detail="completion requested"))
    return count


def _newest(conn: Connection, series_uid: str) -> str:
    """When the series' newest instance was received ("" when it has none)."""
    return conn.execute(select(func.max(INSTANCES.c.received_at))
                        .where(INSTANCES.c.series_uid == series_uid)).scalar() or ""


def _touch(conn: Connection, append: Append, series_uids: Iterable[str]) -> None:
    """Open series seen for the first time; reopen completed ones that received instances since."""
    for uid in series_uids:
        study, count, newest = conn.execute(
            select(func.min(INSTANCES.c.study_uid), func.count(), func.max(INSTANCES.c.received_at))
            .where(INSTANCES.c.series_uid == uid)).one()
        row = conn.execute(select(SERIES).where(SERIES.c.series_uid == uid)).mappings().first()
        if row is None:
            conn.execute(SERIES.insert().values(series_uid=uid, study_uid=study, state="open", generation=1,
                                                instances=0, last_received_at="", completed_at=None,
                                                completed_by="", complete_requested=0))
        elif row["state"] in ("complete", "refused") and newest > row["last_received_at"]:
            conn.execute(update(SERIES).where(SERIES.c.series_uid == uid).values(
                state="open", generation=row["generation"] + 1, complete_requested=0))
            objects = {"series_uid": uid, "study_uid": study, "generation": row["generation"] + 1, "instances": count,
                       "previous_instances": row["instances"]}
            append(audit.Event(type=audit.SERIES_REOPENED, action=audit.Action.UPDATE, actor={"component": "completion"},
                               objects=objects, detail=f"instances arrived after completion ({row['instances']} -> "
                                                       f"{count}); it will be routed again and its new results "
                                                       f"supersede the old"))
            log.info("series reopened: %d instances (was %d when completed)", count, row["instances"])


class Completion:
    """Polls the index; completes and routes series. One instance per database: it remembers in
    memory how far it has read the index (`received_at`, re-read with COMMIT_SLACK of margin).

    Args:
        ledger: the database and the audit trail.
        settings: `routing.stable_seconds`, and what routing needs (data directory, models, attempts).
        rules: returns the rule set to route with (a supervised child loads it when it starts, as `serve` did).
    """

    def __init__(self, ledger: Ledger, settings: Settings, rules: Callable[[], RuleSet]) -> None:
        self.ledger, self.settings, self.rules = ledger, settings, rules
        self.stable = timedelta(seconds=settings.routing.stable_seconds)
        self._since = ""  # the first poll looks at everything

    def poll(self, now: datetime | None = None) -> list[str]:
        """One pass: open or reopen series with new instances, then complete every open series that is
        due - asked for ("manual"), its study quiet for `stable_seconds` ("quiet"), or a matching
        rule's `expected_instances` reached ("expected") - routing it in the same transaction.

        Args:
            now: the time to judge quietness by (tests); default the clock. Timezone-aware.

        Returns:
            The Series Instance UIDs completed (and routed) in this pass.

        Raises:
            Exception: database errors, or a routing failure (e.g. a first instance's file that cannot
                be read); `run` logs them and polls again.
        """
        now = now or datetime.now(timezone.utc)
        with self.ledger.transaction() as (conn, append):
            touched = conn.execute(select(INSTANCES.c.series_uid).where(INSTANCES.c.received_at > self._since)
                                   .distinct()).scalars().all()
            newest = conn.execute(select(func.max(INSTANCES.c.received_at))).scalar()
            _touch(conn, append, touched)
        if newest:
            self._since = utc_iso(datetime.fromisoformat(newest) - COMMIT_SLACK)
        done = []
        ruleset = self.rules()
        with self.ledger.engine.connect() as conn:
            open_series = conn.execute(select(SERIES).where(SERIES.c.state == "open")).mappings().all()
        for row in open_series:
            try:
                reason = self._due(row, now, ruleset)
                if reason and self._complete(row, reason, ruleset):
                    done.append(row["series_uid"])
            except InputError as exc:  # this series' own content: it must not hold up the others
                self._set_aside(row, exc)
        return done

    def _set_aside(self, row: Any, exc: InputError) -> None:
        """Mark a series that cannot be routed as refused, with an audit event; instances that arrive for it
        later reopen it (a corrected resend is routed as usual)."""
        uid = row["series_uid"]
        with self.ledger.transaction() as (conn, append):
            newest = _newest(conn, uid)
            result = conn.execute(update(SERIES).where(SERIES.c.series_uid == uid, SERIES.c.state == "open",
                                                       SERIES.c.generation == row["generation"])
                                  .values(state="refused", last_received_at=newest, completed_at=utc_now(),
                                          completed_by="refused", complete_requested=0))
            if result.rowcount != 1:
                return
            append(audit.Event(type=audit.SERIES_COMPLETE, action=audit.Action.EXECUTE,
                               outcome=audit.Outcome.SERIOUS_FAILURE, actor={"component": "completion"},
                               objects={"series_uid": uid, "study_uid": row["study_uid"],
                                        "generation": row["generation"]},
                               detail=f"set aside, not routed: {exc}; other series proceed; send the series again "
                                      f"(corrected) to have it routed"))
        log.warning("series set aside, not routed: %s. Other series proceed; a corrected resend reopens it.", exc)

    def _due(self, row: Any, now: datetime, ruleset: RuleSet) -> str | None:
        if row["complete_requested"]:
            return "manual"
        with self.ledger.engine.connect() as conn:
            study_newest = conn.execute(select(func.max(INSTANCES.c.received_at))
                                        .where(INSTANCES.c.study_uid == row["study_uid"])).scalar()
            if study_newest and study_newest <= utc_iso(now - self.stable):
                return "quiet"
            if any(isinstance(r.action, Action) and r.action.expected_instances for r in ruleset.rules):
                series = completed_series(conn, row["series_uid"], row["generation"])
                if series.instances:
                    for rule in decide(ruleset, facts(self.settings.data, series)).applied:
                        want = rule.action.expected_instances if isinstance(rule.action, Action) else None
                        if want and len(series.instances) >= want:
                            return "expected"
        return None

    def _complete(self, row: Any, reason: str, ruleset: RuleSet) -> bool:
        uid = row["series_uid"]
        with self.ledger.transaction() as (conn, append):
            series = completed_series(conn, uid, row["generation"])
            newest = _newest(conn, uid)
            result = conn.execute(update(SERIES).where(SERIES.c.series_uid == uid, SERIES.c.state == "open",
                                                       SERIES.c.generation == row["generation"])
                                  .values(state="complete", instances=len(series.instances), last_received_at=newest,
                                          completed_at=utc_now(), completed_by=reason,
                                          complete_requested=0))
            if result.rowcount != 1:
                return False  # reopened or completed meanwhile
            objects = {"series_uid": uid, "study_uid": series.study_uid, "generation": series.generation,
                       "instances": len(series.instances), "input_sha256": series.input_sha256}
            append(audit.Event(type=audit.SERIES_COMPLETE, action=audit.Action.EXECUTE, actor={"component": "completion"},
                               objects=objects, detail=f"complete ({reason})"))
            decision = route(conn, append, series, ruleset, self.settings)
        if newest:
            STAGE_SECONDS.labels("completion_wait").observe(max(0.0, seconds_since(newest)))
        log.info("series complete (%s), %d instance(s), generation %d: %s", reason, len(series.instances),
                 series.generation, "ignored" if decision.ignored else "routed to " + ", ".join(decision.models))
        return True

    def run(self, stop: Callable[[], bool], poll_seconds: float) -> None:
        """`poll` every `poll_seconds` (s) until `stop()` is true; a failed poll is logged and retried."""
        while not stop():
            try:
                self.poll()
            except Exception:  # the next poll retries; nothing is lost, state lives in the database
                log.exception("completion poll failed; retrying in %.1f s", poll_seconds)
            time.sleep(poll_seconds)
