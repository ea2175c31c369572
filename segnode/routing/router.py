"""A completed series + the rules -> a recorded decision and its jobs, in the completing transaction."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select

from segnode.audit import events as audit
from segnode.audit.ledger import Append
from segnode.config import Settings
from segnode.datadir import DataDir
from segnode.db.models import DECISIONS
from segnode.db.queries import completed_series
from segnode.dicom.reader import read_dataset
from segnode.flow import CompletedSeries, JobSpec, RoutingDecision, utc_now
from segnode.jobs.queue import enqueue, supersede_stale
from segnode.models.registry import ModelError, read_manifest
from segnode.routing.facts import facts_for
from segnode.routing.rules import Action, Facts, RuleSet, decide

log = logging.getLogger(__name__)
_SOURCE = re.compile(r"^(?P<protocol>[a-z]+):(?:(?P<ae>[^@]*)@)?(?P<host>.*):(?P<port>\d+)$")


def sender(source: str) -> tuple[str | None, str | None]:
    """(AE title, IP) from the store's peer label, e.g. 'dimse:CT1@10.0.0.5:40112' or 'stow:10.0.0.5:5100'."""
    m = _SOURCE.match(source)
    if not m:
        return None, None
    return (m.group("ae") or None), m.group("host") or None


def facts(data: DataDir, series: CompletedSeries) -> Facts:
    """The rules' view of a series: the first instance's header, the count, 2D/3D, the sender."""
    first = read_dataset(data.path(series.instances[0].path), pixels=False)
    return facts_for(first, len(series.instances), *sender(series.source))


def route(conn: Connection, append: Append, series: CompletedSeries, ruleset: RuleSet,
          settings: Settings) -> RoutingDecision:
    """Decide, record the decision (table + audit, with the rule set's sha256) and queue its jobs, in
    the caller's transaction (the one that completed the series).

    Args:
        series: the completed series version; its first instance's header is what the rules see.
        ruleset: the rules `serve` loaded (segnode.pipeline.ruleset).
        settings: the data directory, the models folder and `jobs.max_attempts`.
    Returns:
        The decision as recorded.
    """
    decision = decide(ruleset, facts(settings.data, series))
    applied = tuple(rule.name for rule in decision.applied)
    recorded = RoutingDecision(series_uid=series.series_uid, generation=series.generation,
                               ruleset_sha256=ruleset.sha256, rules=applied, models=tuple(decision.models))
    conn.execute(DECISIONS.insert().values(series_uid=series.series_uid, generation=series.generation,
                                           ruleset_sha256=ruleset.sha256, rules=json.dumps(list(applied)),
                                           models=json.dumps(decision.models), decided_at=utc_now()))
    objects: dict[str, Any] = {"series_uid": series.series_uid, "study_uid": series.study_uid,
                               "generation": series.generation, "ruleset_sha256": ruleset.sha256,
                               "rules": list(applied), "models": decision.models, "instances": len(series.instances)}
    what = "ignored" if recorded.ignored else "routed to " + ", ".join(decision.models)
    append(audit.Event(type=audit.ROUTING_DECISION, action=audit.Action.EXECUTE, actor={"component": "router"},
                       objects=objects, detail=f"{what} by rule(s) {', '.join(applied) or '(none matched)'}"))
    stale = supersede_stale(conn, append, series.series_uid, series.generation)
    if stale:
        log.info("series generation %d: %d older queued job(s) superseded", series.generation, stale)
    for rule in decision.applied:
        if not isinstance(rule.action, Action):
            continue
        for model in rule.action.models:
            try:
                manifest = read_manifest(settings.models_root / model)
            except ModelError as exc:  # removed since the rules were loaded: a job that says so
                log.error("rule %s names model %s, which cannot be read: %s", rule.name, model, exc)
                version, weights = "missing", "0" * 64
            else:
                version, weights = manifest.version, manifest.weights_sha256
            spec = JobSpec(series_uid=series.series_uid, study_uid=series.study_uid, generation=series.generation,
                           model=model, model_version=version, weights_sha256=weights,
                           input_sha256=series.input_sha256, instances=len(series.instances), rule=rule.name,
                           ruleset_sha256=ruleset.sha256, destinations=tuple(rule.action.destinations),
                           priority=rule.action.priority, assumed_spacing_mm=rule.action.assume_pixel_spacing_mm)
            enqueue(conn, append, spec, settings.jobs.max_attempts)
    return recorded


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


def replay(conn: Connection, data: DataDir, ruleset: RuleSet) -> list[Replayed]:
    """Decide every routed series again with `ruleset`, as a dry run: nothing is written."""
    latest = select(DECISIONS.c.series_uid, DECISIONS.c.generation, DECISIONS.c.rules, DECISIONS.c.models).order_by(
        DECISIONS.c.id)
    last: dict[str, Any] = {}
    for row in conn.execute(latest):
        last[row.series_uid] = row  # the newest decision per series wins
    out = []
    for uid, row in last.items():
        series = completed_series(conn, uid, row.generation)
        if not series.instances:
            continue
        decision = decide(ruleset, facts(data, series))
        out.append(Replayed(uid, json.loads(row.models), decision.models, json.loads(row.rules),
                            [r.name for r in decision.applied]))
    return out
