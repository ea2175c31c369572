"""Bounds on what an HTTP peer can hold, which uvicorn alone does not set: the time to send a request's
headers, the time a request body may stall, and the number of open connections (when full, the connection
that has owed its headers longest makes room for a new one).

uvicorn times out only idle keep-alive connections: a peer that connects and sends nothing, trickles its
headers a byte at a time, or stops in the middle of a body held its connection (and descriptor) forever,
and 300 of them stopped the node answering at all. `guarded_protocol` returns uvicorn's own h11 protocol
with three timers and a connection cap added; everything else is uvicorn's.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLimits:
    """Seconds and counts (HttpConfig): headers complete within `header_timeout` of the connection (or of the
    previous response); a body never stalls longer than `body_idle_timeout` while the node waits for it; at most
    `max_connections` open at once (more are closed on accept); once a body has been arriving for
    `body_idle_timeout`, it must average `min_body_rate` bytes/s (a body trickled a byte just inside the stall
    timeout held its connection for ever, and enough of them kept every other client out)."""

    header_timeout: float
    body_idle_timeout: float
    max_connections: int
    min_body_rate: int = 1024


def guarded_protocol(limits: HttpLimits) -> type[H11Protocol]:
    """uvicorn's H11Protocol with `limits` enforced (pass as uvicorn.Config(http=...))."""

    class GuardedH11Protocol(H11Protocol):
        _last_refusal_log = 0.0
        # connections whose peer owes us request headers, oldest first (one event loop: no lock)
        _waiting: dict["GuardedH11Protocol", None] = {}

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._deadline: asyncio.TimerHandle | None = None
            self._body_start = 0.0  # loop time the current request's body began (0: none yet)
            self._body_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.server_state.connections) >= limits.max_connections and not self._evict_idlest():
                now = time.monotonic()
                if now - GuardedH11Protocol._last_refusal_log > 60:
                    log.warning("HTTP connection from %s closed: %d connections open (http.max_connections), "
                                "every one of them busy with a request", transport.get_extra_info("peername"),
                                limits.max_connections)
                    GuardedH11Protocol._last_refusal_log = now
                transport.close()
                return
            super().connection_made(transport)
            self._arm(limits.header_timeout, "send its request headers")

        @classmethod
        def _evict_idlest(cls) -> bool:
            """Full: close the connection that has owed its request headers longest, if any. Peers holding
            connections open without a request (idle, or trickling headers) cannot then keep a health check
            or a modality out; connections busy with a request are never closed for a newcomer."""
            for oldest in cls._waiting:
                log.info("HTTP peer %s closed to make room: no request headers yet, %d connections open",
                         oldest.client, limits.max_connections)
                oldest._disarm()
                oldest.transport.close()
                return True
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            if self.transport is None:  # closed on accept (the cap): uvicorn never saw it
                return
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            state = self.conn.their_state
            if state is h11.SEND_BODY:  # every body chunk restarts the stall timer, bounded by the minimum rate
                now = self.loop.time()
                if not self._body_start:
                    self._body_start, self._body_bytes = now, 0
                self._body_bytes += len(data)
                rate_due = self._body_start + limits.body_idle_timeout + self._body_bytes / limits.min_body_rate
                self._arm(max(0.0, min(limits.body_idle_timeout, rate_due - now)),
                          f"send its request body at {limits.min_body_rate} bytes/s or more")
                return
            self._body_start = 0.0
            if state is not h11.IDLE:  # headers in (and the body, if any): the application's turn
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # the next request's headers, on a kept-alive connection
                self._arm(max(limits.header_timeout, float(self.timeout_keep_alive)), "send its next request")

        def _arm(self, seconds: float, what: str) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expired, seconds, what)
            if self.conn.their_state is h11.IDLE:  # waiting for headers: the first to go when full
                GuardedH11Protocol._waiting[self] = None

        def _disarm(self) -> None:
            GuardedH11Protocol._waiting.pop(self, None)
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self, seconds: float, what: str) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self.flow.read_paused:  # the application is not reading yet (back-pressure): not the peer's stall
                self._arm(seconds, what)
                return
            log.info("HTTP peer %s did not %s within %.0f s; connection closed", self.client, what, seconds)
            self.transport.close()

    return GuardedH11Protocol


class RefusalAudit:
    """Which refused HTTP requests to audit and log: the first of a kind (a peer host and a status) in each
    `window` seconds,
    carrying how many were refused since the last one recorded. A client without the token could otherwise
    write an audit event and a log line per request (46 MB/s of database and log in a test); every refusal is
    still counted in segnode_http_refusals_total. At most `hosts` kinds are remembered (least recent dropped).
    """

    def __init__(self, window: float = 60.0, hosts: int = 1024) -> None:
        self.window, self.hosts = window, hosts
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()  # host -> (last recorded, unrecorded since)
        self._lock = threading.Lock()

    def admit(self, host: str) -> int | None:
        """None: do not record this refusal (it is counted for the next one); otherwise record it, and say that
        this many refusals of the kind `host` (e.g. "10.0.0.5 401") went unrecorded before it."""
        now = time.monotonic()
        with self._lock:
            last, skipped = self._seen.pop(host, (-self.window, 0))
            if now - last < self.window:
                self._seen[host] = (last, skipped + 1)
                return None
            self._seen[host] = (now, 0)
            while len(self._seen) > self.hosts:
                self._seen.popitem(last=False)
            return skipped
