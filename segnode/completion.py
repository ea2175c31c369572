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
from pathlib import Path
from typing import Callable

from sqlalchemy import func, select, update

from segnode.audit import trail as audit
from segnode.audit.ledger import Ledger
from segnode.db.models import Instance, SeriesState
from segnode.routing.router import facts, route, series_input
from segnode.routing.rules import Action, RuleSet, decide

log = logging.getLogger(__name__)
INSTANCES, SERIES = Instance.__table__, SeriesState.__table__
# an instance's received_at is taken just before its commit; commits finish within this (else the
# store has failed and said so), so re-reading this far back never misses a late commit
COMMIT_SLACK = timedelta(seconds=60)


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="microseconds")


def request_completion(ledger: Ledger, study_uid: str, who: str) -> int:
    """Mark every open series of a study for completion at the next poll; returns how many."""
    with ledger.transaction() as (conn, append):
        _touch(conn, append, conn.execute(select(INSTANCES.c.series_uid).where(
            INSTANCES.c.study_uid == study_uid).distinct()).scalars().all())
        result = conn.execute(update(SERIES).where(SERIES.c.study_uid == study_uid, SERIES.c.state == "open")
                              .values(complete_requested=1))
        count = int(result.rowcount or 0)
        if count:
            append(audit.Event(audit.SERIES_COMPLETE, audit.ACTION_UPDATE, audit.SUCCESS, {"component": who},
                               {"study_uid": study_uid, "series": count}, None, "completion requested"))
    return count


def _touch(conn, append, series_uids) -> None:  # type: ignore[no-untyped-def]
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
        elif row["state"] == "complete" and newest > row["last_received_at"]:
            conn.execute(update(SERIES).where(SERIES.c.series_uid == uid).values(
                state="open", generation=row["generation"] + 1, complete_requested=0))
            append(audit.Event(audit.SERIES_REOPENED, audit.ACTION_UPDATE, audit.SUCCESS, {"component": "completion"},
                               {"series_uid": uid, "study_uid": study, "generation": row["generation"] + 1,
                                "instances": count, "previous_instances": row["instances"]}, None,
                               f"instances arrived after completion ({row['instances']} -> {count}); "
                               f"it will be routed again and its new results supersede the old"))
            log.info("series reopened: %d instances (was %d when completed)", count, row["instances"])


class Completion:
    """Polls the index; completes and routes series. One instance per database."""

    def __init__(self, ledger: Ledger, rules: Callable[[], RuleSet], spool_root: Path, models_dir: Path,
                 stable_seconds: float, max_attempts: int) -> None:
        self.ledger, self.rules = ledger, rules
        self.spool_root, self.models_dir = spool_root, models_dir
        self.stable = timedelta(seconds=stable_seconds)
        self.max_attempts = max_attempts
        self._since = ""  # the first poll looks at everything

    def poll(self, now: datetime | None = None) -> list[str]:
        """One pass; returns the series completed (and routed) in it."""
        now = now or datetime.now(timezone.utc)
        with self.ledger.transaction() as (conn, append):
            touched = conn.execute(select(INSTANCES.c.series_uid).where(INSTANCES.c.received_at > self._since)
                                   .distinct()).scalars().all()
            newest = conn.execute(select(func.max(INSTANCES.c.received_at))).scalar()
            _touch(conn, append, touched)
        if newest:
            self._since = _iso(datetime.fromisoformat(newest) - COMMIT_SLACK)
        done = []
        ruleset = self.rules()
        with self.ledger.engine.connect() as conn:
            open_series = conn.execute(select(SERIES).where(SERIES.c.state == "open")).mappings().all()
        for row in open_series:
            reason = self._due(row, now, ruleset)
            if reason and self._complete(row, reason, ruleset):
                done.append(row["series_uid"])
        return done

    def _due(self, row, now: datetime, ruleset: RuleSet) -> str | None:  # type: ignore[no-untyped-def]
        if row["complete_requested"]:
            return "manual"
        with self.ledger.engine.connect() as conn:
            study_newest = conn.execute(select(func.max(INSTANCES.c.received_at))
                                        .where(INSTANCES.c.study_uid == row["study_uid"])).scalar()
            if study_newest and study_newest <= _iso(now - self.stable):
                return "quiet"
            if any(isinstance(r.action, Action) and r.action.expected_instances for r in ruleset.rules):
                series = series_input(conn, row["series_uid"], row["generation"])
                if series.instances:
                    for rule in decide(ruleset, facts(self.spool_root, series)).applied:
                        want = rule.action.expected_instances if isinstance(rule.action, Action) else None
                        if want and len(series.instances) >= want:
                            return "expected"
        return None

    def _complete(self, row, reason: str, ruleset: RuleSet) -> bool:  # type: ignore[no-untyped-def]
        uid = row["series_uid"]
        with self.ledger.transaction() as (conn, append):
            series = series_input(conn, uid, row["generation"])
            newest = conn.execute(select(func.max(INSTANCES.c.received_at))
                                  .where(INSTANCES.c.series_uid == uid)).scalar() or ""
            result = conn.execute(update(SERIES).where(SERIES.c.series_uid == uid, SERIES.c.state == "open",
                                                       SERIES.c.generation == row["generation"])
                                  .values(state="complete", instances=len(series.instances), last_received_at=newest,
                                          completed_at=_iso(datetime.now(timezone.utc)), completed_by=reason,
                                          complete_requested=0))
            if result.rowcount != 1:
                return False  # reopened or completed meanwhile
            append(audit.Event(audit.SERIES_COMPLETE, audit.ACTION_EXECUTE, audit.SUCCESS, {"component": "completion"},
                               {"series_uid": uid, "study_uid": series.study_uid, "generation": series.generation,
                                "instances": len(series.instances), "input_sha256": series.input_sha256}, None,
                               f"complete ({reason})"))
            decision = route(conn, append, series, ruleset, self.spool_root, self.models_dir, self.max_attempts)
        log.info("series complete (%s), %d instance(s), generation %d: %s", reason, len(series.instances),
                 series.generation, "ignored" if decision.ignored else "routed to " + ", ".join(decision.models))
        return True

    def run(self, stop: Callable[[], bool], poll_seconds: float) -> None:
        while not stop():
            try:
                self.poll()
            except Exception:  # the next poll retries; nothing is lost, state lives in the database
                log.exception("completion poll failed; retrying in %.1f s", poll_seconds)
            time.sleep(poll_seconds)
