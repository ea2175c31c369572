"""Wires the node together: database, spool, audit, DIMSE and HTTP listeners."""

from __future__ import annotations

import logging
import os
import secrets
import threading
from pathlib import Path

import uvicorn

from segnode import __version__
from segnode.audit import trail as audit
from segnode.audit.ledger import Ledger
from segnode.config import Settings
from segnode.db.session import make_engine, migrate
from segnode.dicom.scp import DimseServer
from segnode.spool import Spool
from segnode.store import Peer, StoreService

log = logging.getLogger(__name__)


def load_secret(data_dir: Path) -> bytes:
    """The key for patient-identity hashes: made once per node, never leaves the data directory."""
    path = data_dir / "audit.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
    return path.read_bytes()


def audit_anchor(settings: Settings) -> Path:
    """Where the audit trail's head anchor lives: beside the data, whatever the database."""
    return settings.data_dir / "audit.head"


class Node:
    """A running segnode. `start()` recovers from any earlier crash before accepting anything."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(settings.db_url, durable=settings.storage.fsync)
        migrate(self.engine)
        self.spool = Spool(settings.data_dir, fsync=settings.storage.fsync)
        self.trail = audit.AuditTrail(anchor=audit_anchor(settings))
        self.store = StoreService(self.engine, self.spool, self.trail, load_secret(settings.data_dir),
                                  settings.storage.free_space_floor_mb, settings.storage.free_space_watermark_mb)
        self.ledger = Ledger(self.engine, self.trail)  # state changes with their audit events (completion API)
        self.dimse = DimseServer(settings.dimse, self.store)
        self._http: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self._stopped = False

    def start(self, http: bool = True) -> None:
        self.store.reconcile()
        self.dimse.start()
        if http:
            from segnode.web.app import create_app

            config = uvicorn.Config(create_app(self), host=self.settings.http.host, port=self.settings.http.port,
                                    log_level="warning", access_log=False, lifespan="off")
            self._http = uvicorn.Server(config)
            self._http_thread = threading.Thread(target=self._http.run, name="http", daemon=True)
            self._http_thread.start()
            while not self._http.started and self._http_thread.is_alive():
                threading.Event().wait(0.02)
        self.store.record(audit.Event(audit.APPLICATION_ACTIVITY, audit.ACTION_EXECUTE, audit.SUCCESS,
                                      Peer("local", "localhost", ae_title=self.settings.dimse.ae_title).actor(),
                                      {}, None, f"segnode {__version__} started"))

    @property
    def http_port(self) -> int:
        assert self._http is not None and self._http.servers
        return int(self._http.servers[0].sockets[0].getsockname()[1])

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.dimse.stop()
        if self._http is not None:
            self._http.should_exit = True
            if self._http_thread is not None:
                self._http_thread.join(timeout=5)
        self.store.record(audit.Event(audit.APPLICATION_ACTIVITY, audit.ACTION_EXECUTE, audit.SUCCESS,
                                      Peer("local", "localhost", ae_title=self.settings.dimse.ae_title).actor(),
                                      {}, None, f"segnode {__version__} stopped"))
        self.trail.close()
        self.engine.dispose()
