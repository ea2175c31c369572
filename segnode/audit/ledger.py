"""Transactions in which state changes and their audit events commit together (or not at all)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from sqlalchemy import Connection, Engine

from segnode.audit.trail import AuditTrail, Event
from segnode.db.fast import FastDB, Tx

Append = Callable[[Event], int]  # appends an event in the open transaction; returns its sequence number


class Ledger:
    """The database and the audit trail used together by completion, routing, the queue and the API.

    Args:
        engine: the database (SQLite or PostgreSQL).
        trail: the audit trail; its lock is held for each transaction.
    """

    def __init__(self, engine: Engine, trail: AuditTrail) -> None:
        self.engine, self.trail, self.fast = engine, trail, FastDB(engine)

    @contextmanager
    def transaction(self) -> Iterator[tuple[Connection, Append]]:
        """(connection, append): what is executed on the connection and the events appended commit as one.

        The trail's lock is held throughout, so keep the block short. On any exception (re-raised) the
        transaction rolls back, events included; the head anchor only advances after the commit.
        """
        with self.trail.lock:
            try:
                with self.engine.begin() as conn:
                    tx = Tx(self.fast, conn.connection.cursor())
                    yield conn, lambda event: self.trail.append(tx, event)
            except BaseException:
                self.trail.rolled_back()
                raise
            self.trail.committed()
