"""ATNA: the audit trail shipped off the node, as DICOM audit messages over syslog.

Each event of the trail becomes a DICOM audit message (PS3.15 A.5, the RFC 3881 schema) in an RFC 5424
syslog message (facility authpriv, MSGID "IHE+RFC-3881"), sent over TLS (RFC 5425), TCP with octet
counting (RFC 6587) or UDP (RFC 5426). Its structured data carries the event's sequence number, hash and
the previous event's hash, [segnode@32473 seq= hash= prev=] (32473: the documentation enterprise number),
so a collector holds the chain as it was written: an event edited or removed on the node no longer
matches what the collector received.

The audit table is the queue: each destination keeps a cursor (DATA_DIR/atna/<name>.cursor, the last
sequence number delivered) and a thread sends what follows it, oldest first, once it is on disk (the
trail's head anchor). A collector that is down is retried with growing delays; nothing is dropped. A
batch counts as delivered once the connection is still open a moment after it was sent; a batch sent
just before a collector went away is sent again on the next connection: delivery is at least once, in
order, and `seq` tells a collector the copies apart.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import ssl
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping
from xml.sax.saxutils import quoteattr

from sqlalchemy import Engine, select as sql_select

from segnode.audit.trail import HeadAnchor
from segnode.config import SyslogDestination
from segnode.db.models import AuditEvent

log = logging.getLogger(__name__)

PRIORITY = 10 * 8 + 5  # facility authpriv (10), severity notice (5), as IHE ATNA asks
SD_ID = "segnode@32473"
BATCH = 200
SETTLE = 0.5  # s a connection must stay open after a batch before the batch counts as delivered
MAX_BACKOFF = 30.0

# objects the trail records -> (ParticipantObjectTypeCode, role, ID type code, code system, meaning)
_OBJECT_IDS = {
    "study_uid": ("2", "3", "110180", "DCM", "Study Instance UID"),
    "patient_key": ("1", "1", "2", "RFC-3881", "Patient Number"),  # the node's pseudonym, never the patient ID
}


def _attr(value: Any) -> str:
    return quoteattr(str(value).replace("\n", " "))


def _code(element: str, code: str, meaning: str, system: str = "DCM") -> str:
    return f"<{element} csd-code={_attr(code)} codeSystemName={_attr(system)} originalText={_attr(meaning)}/>"


def audit_message(row: Mapping[str, Any], source_id: str) -> str:
    """The DICOM audit message (PS3.15 A.5.1, one line of XML) for one audit_events row.

    Args:
        row: the row's columns (seq, time, event_id, event_name, action, outcome, status, actor, objects,
            detail, prev_hash, hash); `actor` and `objects` as the JSON the trail stores.
        source_id: the AuditSourceID (the node's AE title by default).
    """
    actor = json.loads(row["actor"] or "{}")
    objects = json.loads(row["objects"] or "{}")
    system = "DCM" if row["event_id"].isdigit() else "99SEGNODE"
    parts = [f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><AuditMessage>",
             f"<EventIdentification EventActionCode={_attr(row['action'])} EventDateTime={_attr(row['time'])} "
             f"EventOutcomeIndicator={_attr(row['outcome'])}>",
             _code("EventID", row["event_id"], row["event_name"], system)]
    if row.get("detail"):
        parts.append(f"<EventOutcomeDescription>{_text(row['detail'])}</EventOutcomeDescription>")
    parts.append("</EventIdentification>")
    user = actor.get("ae_title") or actor.get("user") or actor.get("component") or actor.get("protocol") or "unknown"
    host = actor.get("host", "")
    parts.append(f"<ActiveParticipant UserID={_attr(user)} AlternativeUserID={_attr(json.dumps(actor, sort_keys=True))} "
                 f"UserIsRequestor=\"true\"" + (f" NetworkAccessPointID={_attr(host)} NetworkAccessPointTypeCode=\"2\""
                                                if host else "") + "/>")
    parts.append(f"<AuditSourceIdentification AuditSourceID={_attr(source_id)}>"
                 + _code("AuditSourceTypeCode", "4", "Application Server Process") + "</AuditSourceIdentification>")
    details = {k: v for k, v in objects.items() if k not in _OBJECT_IDS}
    if row.get("status") is not None:
        details["dimse_status"] = f"0x{int(row['status']):04X}"
    for key, (type_code, role, id_code, id_system, meaning) in _OBJECT_IDS.items():
        if key in objects:
            parts.append(f"<ParticipantObjectIdentification ParticipantObjectID={_attr(objects[key])} "
                         f"ParticipantObjectTypeCode={_attr(type_code)} ParticipantObjectTypeCodeRole={_attr(role)}>"
                         + _code("ParticipantObjectIDTypeCode", id_code, meaning, id_system)
                         + "</ParticipantObjectIdentification>")
    if details:
        parts.append("<ParticipantObjectIdentification ParticipantObjectID=\"segnode\" ParticipantObjectTypeCode=\"2\" "
                     "ParticipantObjectTypeCodeRole=\"4\">"
                     + _code("ParticipantObjectIDTypeCode", "SN-DETAIL", "segnode event details", "99SEGNODE")
                     + "".join(f"<ParticipantObjectDetail type={_attr(k)} value={_attr(_b64(v))}/>"
                               for k, v in sorted(details.items()))
                     + "</ParticipantObjectIdentification>")
    parts.append("</AuditMessage>")
    return "".join(parts)


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def _b64(value: Any) -> str:
    import base64

    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return base64.b64encode(text.encode()).decode()


def syslog_message(row: Mapping[str, Any], source_id: str, hostname: str) -> bytes:
    """One RFC 5424 message: header, structured data with the chain (seq, hash, prev), then the audit
    message (UTF-8 with its BOM, as RFC 5424 asks of UTF-8 messages)."""
    stamp = datetime.fromisoformat(row["time"]).isoformat(timespec="microseconds").replace("+00:00", "Z")
    sd = f"[{SD_ID} seq=\"{int(row['seq'])}\" hash=\"{row['hash']}\" prev=\"{row['prev_hash']}\"]"
    header = f"<{PRIORITY}>1 {stamp} {hostname[:255] or '-'} segnode {os.getpid()} IHE+RFC-3881 {sd} "
    return header.encode("ascii", "replace") + b"\xef\xbb\xbf" + audit_message(row, source_id).encode()


class Shipper:
    """Sends the trail to one destination from a thread (see the module's docstring).

    Args:
        dest: the destination's settings.
        engine: the node's database (the audit table).
        anchor: the trail's head anchor file: events past it may not be on disk yet and wait.
        folder: where the cursor file lives (DATA_DIR/atna).
        source_id: the AuditSourceID of the messages.
    """

    def __init__(self, dest: SyslogDestination, engine: Engine, anchor: Path, folder: Path, source_id: str) -> None:
        self.dest, self.engine, self.anchor, self.source_id = dest, engine, anchor, source_id
        folder.mkdir(parents=True, exist_ok=True)
        self.cursor_file = folder / f"{dest.name}.cursor"
        self.cursor = self._read_cursor()
        self.hostname = socket.gethostname()
        self._sock: socket.socket | None = None
        self._sent_upto, self._sent_at = self.cursor, 0.0  # sent, not yet confirmed (see SETTLE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"atna-{dest.name}", daemon=True)
        self.down_since: float | None = None
        self.last_error = ""

    def _read_cursor(self) -> int:
        try:
            return int(self.cursor_file.read_text().split()[0])
        except (FileNotFoundError, IndexError):
            return 0
        except ValueError:
            log.error("%s does not hold a sequence number; sending the audit trail to %s from the start",
                      self.cursor_file, self.dest.name)
            return 0

    def _write_cursor(self, seq: int) -> None:
        tmp = self.cursor_file.with_suffix(".new")
        tmp.write_text(f"{seq}\n")
        os.replace(tmp, self.cursor_file)
        self.cursor = seq

    def start(self) -> None:
        self._thread.start()

    def stop(self, drain: float = 5.0) -> None:
        """Stop after sending what is on disk, waiting up to `drain` s; the rest is sent at the next start."""
        deadline = time.monotonic() + drain
        while time.monotonic() < deadline and self._thread.is_alive() and self.waiting() and self.down_since is None:
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=self.dest.timeout + 2)
        self._close()

    def waiting(self) -> int:
        """Events on disk not yet confirmed delivered."""
        return max(0, self._durable_head() - self.cursor)

    def _durable_head(self) -> int:
        try:
            head = HeadAnchor.read(self.anchor)
        except ValueError:
            head = None
        return head[0] if head else 0

    # -- the thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                if self._step():
                    continue
                backoff = 1.0
                self._recovered()
                self._stop.wait(0.2)
            except Exception as exc:  # noqa: BLE001 - the collector, the network or the database: retried
                if not isinstance(exc, OSError):
                    log.exception("ATNA destination %s: sending failed unexpectedly", self.dest.name)
                self._close()
                self._sent_upto = self.cursor  # unconfirmed: sent again on the next connection
                self._failed(exc)
                self._stop.wait(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)

    def _step(self) -> bool:
        """Confirm what settled, send the next batch; True when more is waiting at once."""
        if self.dest.transport != "udp":
            if self._sock is not None and self._peer_closed():
                raise ConnectionResetError("the collector closed the connection")
            if self._sent_upto > self.cursor and time.monotonic() - self._sent_at >= SETTLE:
                self._write_cursor(self._sent_upto)
        head = self._durable_head()
        if head <= self._sent_upto:
            return False
        with self.engine.connect() as conn:
            rows = conn.execute(sql_select(AuditEvent.__table__).where(AuditEvent.seq > self._sent_upto,
                                                                       AuditEvent.seq <= head)
                                .order_by(AuditEvent.seq).limit(BATCH)).mappings().all()
        if not rows:
            return False
        self._send([syslog_message(dict(r), self.source_id, self.hostname) for r in rows])
        self._sent_upto, self._sent_at = int(rows[-1]["seq"]), time.monotonic()
        if self.dest.transport == "udp":
            self._write_cursor(self._sent_upto)
        return len(rows) == BATCH

    def _send(self, frames: list[bytes]) -> None:
        sock = self._connect()
        if self.dest.transport == "udp":
            for frame in frames:
                sock.send(frame)
            return
        sock.sendall(b"".join(b"%d %s" % (len(f), f) for f in frames))  # RFC 5425 / 6587 octet counting

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        d = self.dest
        if d.transport == "udp":
            sock = socket.socket(socket.AF_INET6 if ":" in d.host else socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect((d.host, d.port))
        else:
            sock = socket.create_connection((d.host, d.port), timeout=d.timeout)
            if d.transport == "tls":
                context = ssl.create_default_context(cafile=str(d.ca_file) if d.ca_file else None)
                if d.cert_file is not None and d.key_file is not None:
                    context.load_cert_chain(str(d.cert_file), str(d.key_file))
                sock = context.wrap_socket(sock, server_hostname=d.host)
        sock.settimeout(d.timeout)
        self._sock = sock
        return sock

    def _peer_closed(self) -> bool:
        """A collector never writes: anything readable (EOF, a TLS alert) means it went away."""
        assert self._sock is not None
        readable, _, _ = select.select([self._sock], [], [], 0)
        return bool(readable)

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def _failed(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("ATNA destination %s (%s:%d, %s) unreachable: %s; %d audit event(s) wait and are sent once it "
                        "answers (retrying with growing delays up to %.0f s)", self.dest.name, self.dest.host,
                        self.dest.port, self.dest.transport, self.last_error, self.waiting(), MAX_BACKOFF)

    def _recovered(self) -> None:
        if self.down_since is not None:
            log.warning("ATNA destination %s reachable again after %.0f s", self.dest.name,
                        time.monotonic() - self.down_since)
            self.down_since = None
