"""A completed series + the rules -> a recorded decision and its jobs, in the completing transaction."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy import Connection, select

from segnode.audit import trail as audit
from segnode.audit.ledger import Append
from segnode.db.models import Instance, RoutingDecision
from segnode.jobs.queue import JobSpec, enqueue, input_hash, now_iso, supersede_stale
from segnode.models.registry import ModelError, read_manifest
from segnode.routing.facts import facts_for
from segnode.routing.rules import Action, Decision, Facts, RuleSet, decide

log = logging.getLogger(__name__)
INSTANCES, DECISIONS = Instance.__table__, RoutingDecision.__table__
_SOURCE = re.compile(r"^(?P<protocol>[a-z]+):(?:(?P<ae>[^@]*)@)?(?P<host>.*):(?P<port>\d+)$")


@dataclass
class SeriesInput:
    series_uid: str
    study_uid: str
    generation: int
    instances: list[tuple[str, str, str]]  # (SOP Instance UID, sha256, spool path), in arrival order
    source: str  # the first instance's sender, as the store recorded it

    @property
    def input_sha256(self) -> str:
        return input_hash([(uid, sha) for uid, sha, _ in self.instances])


def series_input(conn: Connection, series_uid: str, generation: int) -> SeriesInput:
    rows = conn.execute(select(INSTANCES.c.sop_instance_uid, INSTANCES.c.sha256, INSTANCES.c.path,
                               INSTANCES.c.study_uid, INSTANCES.c.source)
                        .where(INSTANCES.c.series_uid == series_uid).order_by(INSTANCES.c.id)).all()
    return SeriesInput(series_uid, rows[0].study_uid if rows else "", generation,
                       [(r.sop_instance_uid, r.sha256, r.path) for r in rows], rows[0].source if rows else "")


def sender(source: str) -> tuple[str | None, str | None]:
    """(AE title, IP) from the store's peer label, e.g. 'dimse:CT1@10.0.0.5:40112' or 'stow:10.0.0.5:5100'."""
    m = _SOURCE.match(source)
    if not m:
        return None, None
    return (m.group("ae") or None), m.group("host") or None


def facts(spool_root: Path, series: SeriesInput) -> Facts:
    """The rules' view of a series: the first instance's header, the count, 2D/3D, the sender."""
    first = dcmread(spool_root / series.instances[0][2], stop_before_pixels=True)
    return facts_for(first, len(series.instances), *sender(series.source))


def route(conn: Connection, append: Append, series: SeriesInput, ruleset: RuleSet, spool_root: Path,
          models_dir: Path, max_attempts: int) -> Decision:
    """Decide, record the decision (table + audit, with the rule set's sha256) and queue its jobs."""
    decision = decide(ruleset, facts(spool_root, series))
    applied = [rule.name for rule in decision.applied]
    conn.execute(DECISIONS.insert().values(series_uid=series.series_uid, generation=series.generation,
                                           ruleset_sha256=ruleset.sha256, rules=json.dumps(applied),
                                           models=json.dumps(decision.models), decided_at=now_iso()))
    objects: dict[str, Any] = {"series_uid": series.series_uid, "study_uid": series.study_uid,
                               "generation": series.generation, "ruleset_sha256": ruleset.sha256,
                               "rules": applied, "models": decision.models, "instances": len(series.instances)}
    what = "ignored" if decision.ignored else "routed to " + ", ".join(decision.models)
    append(audit.Event(audit.ROUTING_DECISION, audit.ACTION_EXECUTE, audit.SUCCESS, {"component": "router"},
                       objects, None, f"{what} by rule(s) {', '.join(applied) or '(none matched)'}"))
    stale = supersede_stale(conn, series.series_uid, series.generation)
    if stale:
        log.info("series generation %d: %d older queued job(s) superseded", series.generation, stale)
    for rule in decision.applied:
        if not isinstance(rule.action, Action):
            continue
        for model in rule.action.models:
            try:
                manifest = read_manifest(models_dir / model)
            except ModelError as exc:  # removed since the rules were loaded: a job that says so
                log.error("rule %s names model %s, which cannot be read: %s", rule.name, model, exc)
                version, weights = "missing", "0" * 64
            else:
                version, weights = manifest.version, manifest.weights_sha256
            enqueue(conn, append, JobSpec(series.series_uid, series.study_uid, series.generation, model, version,
                                          weights, series.input_sha256, len(series.instances), rule.name,
                                          ruleset.sha256, rule.action.destinations, rule.action.priority),
                    max_attempts)
    return decision


@dataclass
class Replayed:
    series_uid: str
    before: list[str]  # models the recorded decision chose (empty: ignored)
    after: list[str]  # models the given rules choose
    rules_before: list[str]
    rules_after: list[str]

    @property
    def changed(self) -> bool:
        return self.before != self.after


def replay(conn: Connection, spool_root: Path, ruleset: RuleSet) -> list[Replayed]:
    """Decide every routed series again with `ruleset`, as a dry run: nothing is written."""
    latest = select(DECISIONS.c.series_uid, DECISIONS.c.generation, DECISIONS.c.rules, DECISIONS.c.models).order_by(
        DECISIONS.c.id)
    last: dict[str, Any] = {}
    for row in conn.execute(latest):
        last[row.series_uid] = row  # the newest decision per series wins
    out = []
    for uid, row in last.items():
        series = series_input(conn, uid, row.generation)
        if not series.instances:
            continue
        decision = decide(ruleset, facts(spool_root, series))
        out.append(Replayed(uid, json.loads(row.models), decision.models, json.loads(row.rules),
                            [r.name for r in decision.applied]))
    return out
