"""The ingest hot path's database access: statements compiled once by SQLAlchemy for the
engine's dialect, executed on the raw DBAPI connection.

SQLAlchemy Core costs ~0.8 ms per instance for lookup + two inserts + commit; the same
statements on the DBAPI cursor cost ~0.16 ms. Compiling through SQLAlchemy keeps them correct
for every dialect (qmark for SQLite, pyformat for PostgreSQL). Values must be plain str/int/None.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

from sqlalchemy import Engine, Table, bindparam, insert, select, update
from sqlalchemy.sql import ClauseElement

KEPT_CONNECTIONS = 8  # per kind (deferred or not): about the associations committing at once


class _Statement:
    def __init__(self, engine: Engine, stmt: ClauseElement) -> None:
        self.compiled = stmt.compile(dialect=engine.dialect)
        self.sql = str(self.compiled)
        positional = getattr(self.compiled, "positional", False)  # SQLCompiler's; `Compiled` does not declare it
        self.order: list[str] | None = getattr(self.compiled, "positiontup", None) if positional else None
        # the bound values construct_params would give for names not passed (LIMIT's literal, None for the rest):
        # looked up per call instead of construct_params, which costs ~10 us a statement on the ingest path
        compiled: Any = self.compiled  # an SQLCompiler: `Compiled.construct_params` does not declare _check
        self.fixed: dict[str, Any] = dict(compiled.construct_params(_check=False) or {})
        self.plain = all(k.isidentifier() for k in self.fixed)  # no bind name that construct_params escapes

    def params(self, values: dict[str, Any]) -> Any:
        if self.plain:
            fixed = self.fixed
            if self.order is not None:
                return tuple(values[k] if k in values else fixed[k] for k in self.order)
            return {k: values[k] if k in values else v for k, v in fixed.items()}
        p = self.compiled.construct_params(values)
        assert p is not None
        return tuple(p[k] for k in self.order) if self.order is not None else p


class Tx:
    """One transaction on a raw connection: statements are compiled once per key and cached by the
    FastDB. Nothing commits here; the owner of the transaction does (FastDB.transaction, Ledger).

    Args:
        db: the statement cache and dialect.
        cursor: a DBAPI cursor of the transaction's connection.
    """

    def __init__(self, db: "FastDB", cursor: Any) -> None:
        self.db, self.cursor = db, cursor

    def execute(self, key: tuple[Any, ...], make: Any, values: dict[str, Any]) -> Any:
        """Run the statement cached under `key` (built by `make()` on first use) with `values`.

        Returns:
            The DBAPI cursor, for fetching.
        """
        stmt = self.db.statement(key, make)
        self.cursor.execute(stmt.sql, stmt.params(values))
        return self.cursor

    def insert(self, table: Table, values: dict[str, Any]) -> None:
        """INSERT one row; `values` by column name."""
        cols = tuple(sorted(values))
        self.execute(("insert", table.name, cols),
                     lambda: insert(table).values({c: bindparam(c) for c in cols}), values)

    def update(self, table: Table, row_id: int, values: dict[str, Any]) -> None:
        """UPDATE the row whose `id` is `row_id`, setting `values` by column name."""
        cols = tuple(sorted(values))
        self.execute(("update", table.name, cols),
                     lambda: update(table).where(table.c.id == bindparam("row_id"))
                     .values({c: bindparam(c) for c in cols}), dict(values, row_id=row_id))

    def first(self, table: Table, columns: tuple[str, ...], where: str, value: Any) -> tuple[Any, ...] | None:
        """`columns` of the first row whose column `where` equals `value` (no order: for unique keys);
        None when there is none."""
        return self.execute(("select", table.name, columns, where),
                            lambda: select(*(table.c[c] for c in columns)).where(table.c[where] == bindparam("v")),
                            {"v": value}).fetchone()

    def last(self, table: Table, columns: tuple[str, ...], order_by: str) -> tuple[Any, ...] | None:
        """`columns` of the row with the greatest `order_by`; None when the table is empty."""
        return self.execute(("last", table.name, columns, order_by),
                            lambda: select(*(table.c[c] for c in columns)).order_by(table.c[order_by].desc()).limit(1),
                            {}).fetchone()


class FastDB:
    """Compiled-statement cache and raw transactions for one engine; shared by threads (the cache only
    grows, by a fixed set of keys)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        self._cache: dict[tuple[Any, ...], _Statement] = {}
        self._idle: dict[bool, list[Any]] = {False: [], True: []}  # SQLite connections kept, by `deferred`
        self._idle_lock = threading.Lock()
        self._closed = False
        # a file's connections are kept (see `transaction`); an in-memory database is one per pooled connection
        self._keep = self.sqlite and engine.url.database not in (None, "", ":memory:") and \
            "memory" not in str(engine.url.query.get("mode", ""))

    def statement(self, key: tuple[Any, ...], make: Any) -> _Statement:
        """The statement cached under `key`, compiling `make()` (a SQLAlchemy construct) on first use."""
        stmt = self._cache.get(key)
        if stmt is None:
            stmt = self._cache[key] = _Statement(self.engine, make())
        return stmt

    def _pooled(self, deferred: bool) -> Iterator[Tx]:
        conn = self.engine.raw_connection()
        deferred = deferred and self.sqlite
        try:
            cursor = conn.cursor()
            try:
                if self.sqlite:
                    if deferred:
                        cursor.execute("PRAGMA synchronous=NORMAL")
                    cursor.execute("BEGIN IMMEDIATE")
                yield Tx(self, cursor)
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
            finally:
                if deferred:
                    cursor.execute("PRAGMA synchronous=FULL")
                cursor.close()
        finally:
            conn.close()

    def _checkout(self, deferred: bool) -> Any:
        """An idle kept connection (SQLite) or a new one: made by the engine's pool, so with its connect
        pragmas, then detached from it; a `deferred` one is set to synchronous=NORMAL once, for good."""
        with self._idle_lock:
            idle = self._idle[deferred]
            if idle:
                return idle.pop()
        conn = self.engine.raw_connection()
        try:
            conn.detach()
            if deferred:
                cursor = conn.cursor()
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.close()
        except BaseException:
            conn.close()
            raise
        return conn

    def _checkin(self, conn: Any, deferred: bool) -> None:
        with self._idle_lock:
            idle = self._idle[deferred]
            if not self._closed and len(idle) < KEPT_CONNECTIONS:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close the connections kept for SQLite transactions (idempotent); a transaction started later
        still works, on a connection closed when it ends."""
        with self._idle_lock:
            self._closed = True
            conns = self._idle[False] + self._idle[True]
            self._idle = {False: [], True: []}
        for conn in conns:
            conn.close()

    @contextmanager
    def transaction(self, deferred: bool = False) -> Iterator[Tx]:
        """A Tx on a raw connection: committed when the block ends, rolled back (and re-raised) on any
        exception. On SQLite it begins IMMEDIATE, taking the write lock at once.

        SQLite connections are kept open between transactions, apart from the engine's pool (checking one
        out of the pool and resetting it on return cost more than the ingest path's statements): those of
        deferred transactions stay at synchronous=NORMAL, the others keep the engine's setting. A connection
        whose transaction failed is closed, not kept. PostgreSQL (and in-memory SQLite) use the engine's pool.

        Args:
            deferred: on SQLite, commit without flushing the WAL (synchronous=NORMAL): durable against a
                process crash at once, against a power loss once segnode.db.walsync flushes. Only for an
                engine made durable (segnode.db.session.make_engine), and only for what start-up recovery
                can rebuild.
        """
        if not self._keep:
            yield from self._pooled(deferred)
            return
        conn = self._checkout(deferred)
        try:
            cursor = conn.cursor()
            try:
                cursor.execute("BEGIN IMMEDIATE")  # see segnode.db.session: several processes write
                yield Tx(self, cursor)
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
            finally:
                cursor.close()
        except BaseException:
            conn.close()  # not kept: whatever failed may have left it unusable
            raise
        self._checkin(conn, deferred)
