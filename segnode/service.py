"""Wires the node together: database, spool, audit, DIMSE and HTTP listeners."""

from __future__ import annotations

import logging
import os
import secrets
import threading
from typing import TYPE_CHECKING

import uvicorn
from sqlalchemy import text

from segnode import __version__
from segnode.audit import events as audit
from segnode.audit.ledger import Ledger
from segnode.audit.atna import Shipper, stop_all
from segnode.audit.trail import AuditTrail
from segnode.config import Settings
from segnode.datadir import DataDir, fsync_dir
from segnode.db.session import make_engine, migrate
from segnode.errors import ConfigurationError
from segnode.health import Operations
from segnode.metrics import NodeCollector
from segnode.ingest.scp import DimseServer
from segnode.ingest.spool import Spool
from segnode.ingest.store import Peer, StoreService
from segnode.listen import listening_socket
from segnode.lock import DataDirLock

if TYPE_CHECKING:
    from segnode.jobs.dispatch import Dispatcher

log = logging.getLogger(__name__)


KEY_BYTES = 32


def load_secret(data: DataDir) -> bytes:
    """The key for patient-identity hashes: made once per node, never leaves the data directory.

    Created on first use as 32 random bytes in the data directory's audit key file (mode 0600): written and
    fsynced under a temporary name, then linked into place, so a crash never leaves an empty or short key
    behind (which would have keyed every later hash with nothing); losing it unlinks every later patient key
    from the earlier ones.

    Returns:
        The key's bytes, as stored.

    Raises:
        ConfigurationError: the key file exists but does not hold a 32-byte key (the message says what to do).
        OSError: the file cannot be created or read.
    """
    path = data.audit_key
    if not path.exists():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(KEY_BYTES))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic, and never replaces a key another process made meanwhile
            except FileExistsError:
                pass
            fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise ConfigurationError(f"{path} holds {len(key)} bytes, not a {KEY_BYTES}-byte key; restore it from a "
                                 f"backup (patient keys depend on it), or remove it to start a new, unlinked one")
    return key


class Node:
    """The receiving side of a running segnode: DIMSE and HTTP listeners over one store.

    `start()` recovers from any earlier crash before accepting anything. The later stages
    (completion, workers) run beside it as processes (segnode.supervisor) or in-process (tests, demo).

    Constructing it creates the data directory, takes its lock (one node per data directory), opens the
    database and applies migrations, so it raises what those raise (DataDirInUse, OSError,
    SQLAlchemy/Alembic errors); nothing listens until `start`; `stop` lets the lock go.

    Args:
        settings: the node's settings (data directory, database URL, storage, DIMSE, HTTP).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.lock = DataDirLock(settings.data_dir)
        self.lock.acquire()  # before anything touches the directory: a second node stops here
        try:
            self.engine = make_engine(settings.db_url, durable=settings.storage.fsync)
            migrate(self.engine)
            self.spool = Spool(settings.data, fsync=settings.storage.fsync)
            self.trail = AuditTrail(anchor=settings.data.audit_head)
            self.store = StoreService(self.engine, self.spool, self.trail, load_secret(settings.data),
                                      settings.storage)
            self.ledger = Ledger(self.engine, self.trail)  # state changes with their audit events (completion API)
            self.dimse = DimseServer(settings.dimse, self.store)
            self.ops = Operations()  # /readyz and /metrics; `segnode serve` adds its workers' check
            self.health = self.ops.health
            self.health.add("disk", self.store.disk_not_ready)
            self.health.add("database", self._database_not_ready)
            self.health.add("dimse", self.dimse.not_accepting)
            self.ops.metrics.register(NodeCollector(self.store, lambda: self.dimse.associations, self.health))
        except BaseException:
            self.lock.release()
            raise
        self._http: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self._stopped = False
        source_id = settings.audit.source_id or settings.dimse.ae_title
        self.atna = [Shipper(dest, self.engine, settings.data.audit_head, settings.data.atna, source_id)
                     for dest in settings.audit.syslog]  # the trail, shipped off the node (started by `start`)
        self.dispatcher: Dispatcher | None = None
        if settings.jobs.executor == "celery":  # segment jobs go to remote workers through the broker
            from segnode.jobs.dispatch import Dispatcher

            self.dispatcher = Dispatcher(settings, self.ledger)
            self.health.add("broker", self.dispatcher.not_ready)

    def start(self, http: bool = True) -> None:
        """Reconcile the spool with the index, start the DIMSE listener and (with `http`) uvicorn in a
        thread, waiting until it serves; then audit "started".

        Raises:
            ConfigurationError: the HTTP or DIMSE address cannot be bound (the message names the setting);
                nothing has started then.
        """
        http_socket = (listening_socket(self.settings.http.host, self.settings.http.port, "http", backlog=2048)
                       if http else None)  # both ports bound before recovery touches the data directory
        try:
            self.dimse.bind()
            self.store.reconcile()
            self.dimse.start()
        except BaseException:
            self.dimse.stop()
            if http_socket is not None:
                http_socket.close()
            raise
        if http_socket is not None:
            from segnode.web.app import create_app

            from segnode.web.guard import HttpLimits, guarded_protocol

            cfg = self.settings.http
            protocol = guarded_protocol(HttpLimits(cfg.header_timeout, cfg.body_idle_timeout, cfg.max_connections,
                                                    cfg.min_body_rate))
            config = uvicorn.Config(create_app(self.settings, self.store, self.ledger, self.ops), log_level="warning",
                                    access_log=False, lifespan="off", http=protocol,
                                    timeout_keep_alive=int(max(1, cfg.keep_alive_timeout)))
            self._http = uvicorn.Server(config)
            self._http_thread = threading.Thread(target=self._http.run, kwargs={"sockets": [http_socket]},
                                                 name="http", daemon=True)
            self._http_thread.start()
            while not self._http.started and self._http_thread.is_alive():
                threading.Event().wait(0.02)
        self._record_activity("started")
        for shipper in self.atna:
            shipper.start()
        if self.dispatcher is not None:
            self.dispatcher.start()

    def _database_not_ready(self) -> str | None:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - any failure to answer is the reason
            return f"database: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}; check database_url and the server"
        return None

    def _record_activity(self, what: str) -> None:
        actor = Peer("local", "localhost", ae_title=self.settings.dimse.ae_title).actor()
        self.store.record(audit.Event(type=audit.APPLICATION_ACTIVITY, action=audit.Action.EXECUTE, actor=actor,
                                      detail=f"segnode {__version__} {what}"))

    @property
    def http_port(self) -> int:
        """The bound HTTP port (the real one when `http.port` is 0); only after `start(http=True)`."""
        assert self._http is not None and self._http.servers
        return int(self._http.servers[0].sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Stop the listeners (waiting up to 5 s for HTTP), audit "stopped", close the trail and the
        database. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.dispatcher is not None:
            self.dispatcher.stop()
        self.dimse.stop()
        if self._http is not None:
            self._http.should_exit = True
            if self._http_thread is not None:
                self._http_thread.join(timeout=5)
        self._record_activity("stopped")
        self.store.close()
        stop_all(self.atna)  # after the last event is on disk: it is sent too
        self.trail.close()
        self.engine.dispose()
        self.lock.release()
