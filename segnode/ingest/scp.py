"""The DIMSE listener: accepts connections, applies TLS and the association limit, and runs
each association on its own thread."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from pathlib import Path

from segnode.audit import events as audit
from segnode.config import DimseConfig
from segnode.errors import ConfigurationError
from segnode.ingest.ul import Association, warm_contexts
from segnode.ingest.store import Peer, StoreService
from segnode.listen import listening_socket

log = logging.getLogger(__name__)
PENDING_CONNECTIONS = 32  # connections beyond max_associations that may be sending their request at once


def server_tls_context(cfg: DimseConfig) -> ssl.SSLContext | None:
    """The listener's TLS context (TLS 1.2 or later), or None when `dimse.tls` is off.

    With a CA file, client certificates are verified: required when `require_client_cert`, else
    checked only if offered.

    Raises:
        ConfigurationError: a certificate, key or CA file is missing, unreadable or does not match (the
            message names the setting and the file).
    """
    tls = cfg.tls
    if not tls.enabled:
        return None
    files = {"dimse.tls.cert_file": tls.cert_file, "dimse.tls.key_file": tls.key_file, "dimse.tls.ca_file": tls.ca_file}
    for key, path in files.items():
        if path is not None and not Path(path).is_file():
            raise ConfigurationError(f"{key}: {path} is not a readable file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"dimse.tls.cert_file {tls.cert_file} with key_file {tls.key_file}: cannot load "
                                 f"them ({exc}); a PEM certificate and its private key are needed") from None
    if tls.ca_file:
        try:
            ctx.load_verify_locations(str(tls.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"dimse.tls.ca_file {tls.ca_file}: cannot load it ({exc})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


class DimseServer:
    """The C-STORE/C-ECHO listener: one accept thread, one thread per association (all daemons).

    Every association is counted against `max_associations` and refused (A-ASSOCIATE-RJ, transient)
    above it or below the free-space watermark; a failed TLS handshake is audited as a security alert.

    Args:
        cfg: host, port (0: any free one), AE title, TLS, limits and timeouts (s).
        store: where received instances are committed.
    """

    def __init__(self, cfg: DimseConfig, store: StoreService) -> None:
        self.cfg, self.store = cfg, store
        self.tls = server_tls_context(cfg)
        self._max_connections = cfg.max_associations + PENDING_CONNECTIONS
        self._sock: socket.socket | None = None
        self._active: set[socket.socket] = set()  # every open connection, identified or not
        self._associated = 0  # associations admitted (identified, accepted): what max_associations counts
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def associations(self) -> int:
        """Associations under way (admitted, not yet ended)."""
        return self._associated

    def not_accepting(self) -> str | None:
        """None while the listener accepts associations, else why not (readiness)."""
        if self._sock is None or self._thread is None:
            return "the DIMSE listener has not started"
        if self._stopping.is_set() or not self._thread.is_alive():
            return "the DIMSE listener has stopped; restart the node"
        return None

    @property
    def port(self) -> int:
        """The bound TCP port (the real one when `cfg.port` is 0); only after `start`."""
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    def bind(self) -> None:
        """Bind and listen (connections wait in the backlog until `start`); idempotent.

        Raises:
            ConfigurationError: the address cannot be bound (e.g. port in use), naming the settings.
        """
        if self._sock is None:
            self._sock = listening_socket(self.cfg.host, self.cfg.port, "dimse")

    def start(self) -> None:
        """Bind (unless `bind` did), listen and start accepting in a background thread; returns at once.

        Raises:
            ConfigurationError: the address cannot be bound (e.g. port in use), naming the settings.
        """
        self.bind()
        assert self._sock is not None
        warm_contexts()
        self._thread = threading.Thread(target=self._accept_loop, name="dimse-accept", daemon=True)
        self._thread.start()
        if self.cfg.allowed_peers is None:
            log.warning("dimse.allowed_peers is not set: any peer that reaches %s:%d may store instances",
                        self.cfg.host, self.port)
        log.info("DIMSE listener %s on %s:%d%s", self.cfg.ae_title, self.cfg.host, self.port,
                 " (TLS)" if self.tls else "")

    def stop(self) -> None:
        """Close the listening socket and shut down open associations' sockets (their threads then end
        on the error); waits up to 5 s for the accept thread, not for the associations."""
        self._stopping.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        with self._lock:
            for conn in list(self._active):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _admit(self) -> str | None:
        """Decide whether a new association may start (called once it is identified); an admitted one holds
        a slot until it ends. Connections still sending their request hold none: slow peers cannot lock out
        the modalities that have identified themselves."""
        if self.store.below_watermark():
            return "disk below the free-space watermark; free space or raise storage limits"
        with self._lock:
            if self._associated >= self.cfg.max_associations:
                return f"more than {self.cfg.max_associations} associations at once"
            self._associated += 1
        return None

    def _accept_loop(self) -> None:
        assert self._sock is not None
        last_warning = -1e9
        while not self._stopping.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                # out of descriptors or memory (EMFILE, ENFILE, ENOBUFS): pending peers wait in the backlog
                # while associations end; back off instead of spinning and logging in a loop
                if time.monotonic() - last_warning > 60:
                    log.error("DIMSE accept() failed: %s; retrying every 0.1 s (raise the open-file limit, "
                              "or lower dimse.max_associations)", exc)
                    last_warning = time.monotonic()
                time.sleep(0.1)
                continue
            with self._lock:
                crowded = len(self._active) >= self._max_connections
            if crowded:  # unidentified peers hold a thread and a buffer each: bounded, oldest served first
                if time.monotonic() - last_warning > 60:
                    log.warning("DIMSE connection from %s:%d closed: %d connections open, most not yet associated "
                                "(dimse.max_associations + %d pending)", addr[0], addr[1], len(self._active),
                                PENDING_CONNECTIONS)
                    last_warning = time.monotonic()
                conn.close()
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn, addr, time.monotonic()),
                             name=f"assoc-{addr[0]}:{addr[1]}", daemon=True).start()

    def _serve(self, conn: socket.socket, addr: tuple[str, int], accepted_at: float) -> None:
        raw = conn
        association: Association | None = None
        with self._lock:
            self._active.add(raw)
        try:
            if self.tls is not None:
                try:
                    conn.settimeout(self.cfg.acse_timeout)
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    log.warning("TLS handshake with %s:%d failed: %s", addr[0], addr[1], exc)
                    self.store.record(audit.Event(type=audit.SECURITY_ALERT, action=audit.Action.EXECUTE,
                                                  outcome=audit.Outcome.SERIOUS_FAILURE,
                                                  actor=Peer("dimse", addr[0], addr[1]).actor(),
                                                  detail=f"TLS handshake failed: {type(exc).__name__}"))
                    conn.close()
                    return
            association = Association(conn, addr[:2], self.cfg, self.store, self._admit, accepted_at)
            association.run()
        finally:
            with self._lock:
                self._active.discard(raw)
                if association is not None and association.admitted:
                    self._associated -= 1
