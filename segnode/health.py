"""Readiness: whether the node can take and process work now, with the reason when it cannot.

Liveness (the process answers) is /livez; readiness (/readyz) runs every check registered here: the
disk above the free-space watermark, the database answering, the DIMSE listener accepting and, under
`segnode serve`, at least one worker process running. An orchestrator stops routing to a node that is
not ready (503 with the reasons) instead of restarting it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

Check = Callable[[], "str | None"]  # None when fine, else why not (one line, what to do)


class Health:
    """Named readiness checks; each returns None when fine or the reason it is not."""

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}
        self._lock = threading.Lock()

    def add(self, name: str, check: Check) -> None:
        """Register (or replace) the check `name`."""
        with self._lock:
            self._checks[name] = check

    def failing(self) -> dict[str, str]:
        """{check name: reason} of every check that fails now (a check that raises fails with its error)."""
        with self._lock:
            checks = dict(self._checks)
        failed: dict[str, str] = {}
        for name, check in checks.items():
            try:
                reason = check()
            except Exception as exc:  # noqa: BLE001 - a broken check is a failed one, never a 500
                log.warning("readiness check %s raised %s", name, exc)
                reason = f"{type(exc).__name__}: {exc}"[:300]
            if reason:
                failed[name] = reason
        return failed

    @property
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._checks)


@dataclass
class Operations:
    """What the HTTP side shows operators besides the API: readiness checks and the node's own metrics
    (segnode.metrics.NodeCollector, registered by segnode.service.Node)."""

    health: Health = field(default_factory=Health)
    metrics: CollectorRegistry = field(default_factory=CollectorRegistry)
