"""The stages after the listener - completion (with routing) and workers - built from the settings.
Each runs in its own process under `segnode serve`; tests build them in-process."""

from __future__ import annotations

from pathlib import Path

from segnode.audit.ledger import Ledger
from segnode.audit.trail import AuditTrail
from segnode.completion import Completion
from segnode.config import Settings
from segnode.db.session import make_engine, migrate
from segnode.jobs.worker import Runner, Worker
from segnode.models.registry import default_models_dir, list_models
from segnode.routing.rules import RuleSet, load_rules


def models_dir(settings: Settings) -> Path:
    return settings.jobs.models_dir or default_models_dir()


def ruleset(settings: Settings) -> RuleSet:
    """The configured rules, validated against the installed models (RulesError names the problem)."""
    installed = [folder.name for folder in list_models(models_dir(settings))]
    return load_rules(settings.routing.rules, models=installed, destinations=settings.destinations)


def rule_models(settings: Settings) -> list[str]:
    """The models the configured rules can start, in rule order."""
    return list(dict.fromkeys(m for rule in ruleset(settings).rules if not isinstance(rule.action, str)
                              for m in rule.action.models))


def ledger(settings: Settings) -> Ledger:
    from segnode.service import audit_anchor

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db_url, durable=settings.storage.fsync)
    migrate(engine)
    return Ledger(engine, AuditTrail(anchor=audit_anchor(settings)))


def completion(settings: Settings, shared: Ledger | None = None) -> Completion:
    rules = ruleset(settings)
    return Completion(shared or ledger(settings), lambda: rules, settings.data_dir, models_dir(settings),
                      settings.routing.stable_seconds, settings.jobs.max_attempts)


def worker(settings: Settings, shared: Ledger | None = None, runner: Runner | None = None) -> Worker:
    return Worker(shared or ledger(settings), settings.data_dir, settings.data_dir, models_dir(settings),
                  settings.jobs.lease_seconds, settings.jobs.backoff_seconds, settings.jobs.device, runner,
                  settings.destinations, settings.routing.default_destinations, settings.dimse.ae_title,
                  settings.outputs)
