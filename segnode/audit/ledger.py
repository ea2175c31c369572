"""Transactions in which state changes and their audit events commit together (or not at all)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from sqlalchemy import Connection, Engine

from segnode.audit.trail import AuditTrail, Event
from segnode.db.fast import FastDB, Tx

Append = Callable[[Event], int]


class Ledger:
    def __init__(self, engine: Engine, trail: AuditTrail) -> None:
        self.engine, self.trail, self.fast = engine, trail, FastDB(engine)

    @contextmanager
    def transaction(self) -> Iterator[tuple[Connection, Append]]:
        """(connection, append): what is executed on the connection and the events appended commit as one."""
        with self.trail.lock:
            try:
                with self.engine.begin() as conn:
                    tx = Tx(self.fast, conn.connection.cursor())
                    yield conn, lambda event: self.trail.append(tx, event)
            except BaseException:
                self.trail.rolled_back()
                raise
            self.trail.committed()
