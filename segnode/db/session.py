"""Engine creation and migrations at start.

SQLite runs in WAL mode. With `durable` (storage.fsync, the default) every commit is fsynced
(synchronous=FULL), so what it records survives a power loss, not just a process crash; the one
exception is a new instance's index row, committed deferred (segnode.db.fast, segnode.db.walsync) and
rebuilt from its fsynced file if a power loss takes it. Without `durable` (synchronous=NORMAL) commits
survive a process crash and the start-up recovery re-indexes the spool after a power loss.

Every SQLite transaction begins IMMEDIATE, reads through `engine.connect()` included: it takes the
database's write lock (waiting up to 30 s for it), so a reader waits for a writer's commit.
"""

from __future__ import annotations

import logging
from typing import Any
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).with_name("migrations")


def make_engine(url: str, durable: bool = True) -> Engine:
    """An engine for `url` (sqlite:///path or postgresql://...), configured as the module describes.

    Args:
        url: SQLAlchemy URL (`db_url` in the settings).
        durable: fsync every SQLite commit (storage.fsync); ignored for PostgreSQL, whose own
            settings decide.
    """
    if url.startswith("sqlite"):
        synchronous = "FULL" if durable else "NORMAL"

        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # transactions are begun explicitly, below and in FastDB
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            # Take the write lock up front: a deferred transaction that reads, then writes after another
            # process committed fails at once (SQLITE_BUSY_SNAPSHOT) instead of waiting its turn. The
            # listener, completion, router and workers are separate processes writing one database.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent), in one transaction.

    Raises:
        sqlalchemy.exc.SQLAlchemyError, alembic errors: a migration failed; its transaction is rolled back.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    log.debug("database schema at head")
