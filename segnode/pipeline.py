"""The stages after the listener - completion (with routing) and workers - built from the settings.

Each runs in its own process under `segnode serve` (segnode.stage); tests and the demo build them
in-process. Every builder takes the same Settings, so every command sees the rules `serve` sees.
"""

from __future__ import annotations

from segnode.audit.ledger import Ledger
from segnode.audit.trail import AuditTrail
from segnode.completion import Completion
from segnode.config import Settings
from segnode.db.session import make_engine, migrate
from segnode.jobs.worker import Runner, Worker
from segnode.models.registry import list_models
from segnode.routing.rules import RuleSet, load_rules


def ruleset(settings: Settings) -> RuleSet:
    """The configured rules (`routing.rules`, else the built-in ones), validated against the installed
    models and the configured destinations.

    Raises:
        RulesError: naming the rule, the field and the problem.
    """
    installed = [folder.name for folder in list_models(settings.models_root)]
    return load_rules(settings.routing.rules, models=installed, destinations=settings.destinations)


def rule_models(settings: Settings) -> list[str]:
    """The models the configured rules can start, in rule order."""
    return list(dict.fromkeys(m for rule in ruleset(settings).rules if not isinstance(rule.action, str)
                              for m in rule.action.models))


def ledger(settings: Settings) -> Ledger:
    """The database (migrated to the current schema) and the audit trail anchored in the data directory."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db_url, durable=settings.storage.fsync)
    migrate(engine)
    return Ledger(engine, AuditTrail(anchor=settings.data.audit_head))


def completion(settings: Settings, shared: Ledger | None = None) -> Completion:
    """Completion and routing with the configured rules (RulesError when they are invalid)."""
    rules = ruleset(settings)
    return Completion(shared or ledger(settings), settings, lambda: rules)


def worker(settings: Settings, shared: Ledger | None = None, runner: Runner | None = None) -> Worker:
    """A worker on the queue of `settings`' database; `runner` replaces inference (tests)."""
    return Worker(shared or ledger(settings), settings, runner=runner)
