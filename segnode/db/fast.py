"""The ingest hot path's database access: statements compiled once by SQLAlchemy for the
engine's dialect, executed on the raw DBAPI connection.

SQLAlchemy Core costs ~0.8 ms per instance for lookup + two inserts + commit; the same
statements on the DBAPI cursor cost ~0.16 ms. Compiling through SQLAlchemy keeps them correct
for every dialect (qmark for SQLite, pyformat for PostgreSQL). Values must be plain str/int/None.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from sqlalchemy import Engine, Table, bindparam, insert, select, update
from sqlalchemy.sql import ClauseElement


class _Statement:
    def __init__(self, engine: Engine, stmt: ClauseElement) -> None:
        self.compiled = stmt.compile(dialect=engine.dialect)
        self.sql = str(self.compiled)
        positional = getattr(self.compiled, "positional", False)  # SQLCompiler's; `Compiled` does not declare it
        self.order: list[str] | None = getattr(self.compiled, "positiontup", None) if positional else None

    def params(self, values: dict[str, Any]) -> Any:
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

    def statement(self, key: tuple[Any, ...], make: Any) -> _Statement:
        """The statement cached under `key`, compiling `make()` (a SQLAlchemy construct) on first use."""
        stmt = self._cache.get(key)
        if stmt is None:
            stmt = self._cache[key] = _Statement(self.engine, make())
        return stmt

    @contextmanager
    def transaction(self, deferred: bool = False) -> Iterator[Tx]:
        """A Tx on a pooled raw connection: committed when the block ends, rolled back (and re-raised) on
        any exception. On SQLite it begins IMMEDIATE, taking the write lock at once.

        Args:
            deferred: on SQLite, commit without flushing the WAL (synchronous=NORMAL for this transaction;
                the connection is set back to FULL after): durable against a process crash at once, against
                a power loss once segnode.db.walsync flushes. Only for an engine made durable
                (segnode.db.session.make_engine), and only for what start-up recovery can rebuild.
        """
        conn = self.engine.raw_connection()
        deferred = deferred and self.sqlite
        try:
            cursor = conn.cursor()
            try:
                if self.sqlite:
                    if deferred:
                        cursor.execute("PRAGMA synchronous=NORMAL")
                    cursor.execute("BEGIN IMMEDIATE")  # see segnode.db.session: several processes write
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
