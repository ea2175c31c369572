"""ATNA: the audit trail shipped off the node, as DICOM audit messages over syslog.

Each event of the trail becomes a DICOM audit message (PS3.15 A.5, the RFC 3881 schema) in an RFC 5424
syslog message (facility authpriv, MSGID "IHE+RFC-3881"), sent over TLS (RFC 5425), TCP with octet
counting (RFC 6587) or UDP (RFC 5426). Its structured data carries the event's sequence number, hash and
the previous event's hash, [segnode@32473 seq= hash= prev=] (32473: the documentation enterprise number),
so a collector holds the chain as it was written: an event edited or removed on the node no longer
matches what the collector received.

The audit table is the queue: each destination keeps a cursor (DATA_DIR/atna/<name>.cursor, the last
sequence number delivered) and a thread sends what follows it, oldest first, once it is on disk (the
trail's head anchor). A collector that is down is retried with growing delays. A batch counts as
delivered once the collector's TCP has acknowledged every byte and the connection is still open a moment
(SETTLE) after it was sent; a batch sent just before a collector went away is sent again on the next
connection: delivery is at least once, in order, and `seq` tells a collector the copies apart. Syslog
itself has no acknowledgement: a collector that acknowledged bytes at the TCP level and then died before
writing them loses them, which only a protocol with replies (RELP) could tell; `segnode audit verify` on
the node and the chain's hashes at the collector show such a gap. A message too long for a UDP datagram
is sent shortened (see syslog_message).
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import select
import socket
import ssl
import struct
import termios
import threading
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping
from xml.sax.saxutils import quoteattr

from sqlalchemy import Engine, select as sql_select

from segnode.audit.trail import HeadAnchor
from segnode.config import SyslogDestination
from segnode.db.models import AuditEvent
from segnode.logs import printable

log = logging.getLogger(__name__)

PRIORITY = 10 * 8 + 5  # facility authpriv (10), severity notice (5), as IHE ATNA asks
SD_ID = "segnode@32473"
BATCH = 200
SETTLE = 0.5  # s a connection must stay open after a batch before the batch counts as delivered
MAX_BACKOFF = 30.0
TEXT_LIMIT = 2000  # characters of one XML attribute or text (control characters escaped: segnode.logs.printable)
UDP_LIMIT = 65000  # bytes of one datagram (IPv4 allows 65507); a longer message goes without its details

# objects the trail records -> (ParticipantObjectTypeCode, role, ID type code, code system, meaning)
_OBJECT_IDS = {
    "study_uid": ("2", "3", "110180", "DCM", "Study Instance UID"),
    "patient_key": ("1", "1", "2", "RFC-3881", "Patient Number"),  # the node's pseudonym, never the patient ID
}


def _attr(value: Any, limit: int = TEXT_LIMIT) -> str:
    return quoteattr(printable(str(value), limit))


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
    if row["event_id"] == "110100":  # Application Activity: start or stop (PS3.15 A.5.3.1)
        for word, code, meaning in (("started", "110120", "Application Start"), ("stopped", "110121", "Application Stop")):
            if str(row.get("detail") or "").endswith(word):
                parts.append(_code("EventTypeCode", code, meaning))
    if row.get("detail"):
        parts.append(f"<EventOutcomeDescription>{_text(row['detail'])}</EventOutcomeDescription>")
    parts.append("</EventIdentification>")
    user = actor.get("ae_title") or actor.get("user") or actor.get("component") or actor.get("protocol") or "unknown"
    actor_role, other = _roles(row["event_id"], row["action"], actor, objects, source_id)
    parts.append(_participant(user, actor, True, actor_role))
    if other is not None:
        parts.append(_participant(other[0], {}, False, other[1]))
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
                     + "".join(f"<ParticipantObjectDetail type={_attr(k)} value={_attr(_b64(v), limit=10**9)}/>"
                               for k, v in sorted(details.items()))
                     + "</ParticipantObjectIdentification>")
    parts.append("</AuditMessage>")
    return "".join(parts)


_ROLES = {"source": ("110153", "Source Role ID"), "destination": ("110152", "Destination Role ID"),
          "application": ("110150", "Application")}


def _roles(event_id: str, action: str, actor: Mapping[str, Any], objects: Mapping[str, Any],
           node: str) -> tuple[str | None, tuple[str, str] | None]:
    """The actor's RoleIDCode, and the other participant (UserID, role) PS3.15 A.5.3 names: for instances
    transferred (110104, 110102) the sender is the Source and the receiver the Destination (a peer storing
    to the node: the node; the node delivering: the destination); for application activity, the node is
    the Application."""
    if event_id in ("110104", "110102"):
        if action in ("C", "U"):  # received: the peer sent, the node holds
            return "source", (node, "destination")
        if objects.get("destination"):
            return "source", (str(objects["destination"]), "destination")
        return "source", None
    if event_id == "110100":
        return "application", None
    return None, None


def _participant(user: str, actor: Mapping[str, Any], requestor: bool, role: str | None) -> str:
    """One ActiveParticipant: NetworkAccessPointTypeCode 2 for an IP address, 1 for a machine name."""
    host = str(actor.get("host", ""))
    access = ""
    if host:
        try:
            ipaddress.ip_address(host)
            kind = "2"
        except ValueError:
            kind = "1"
        access = f" NetworkAccessPointID={_attr(host)} NetworkAccessPointTypeCode=\"{kind}\""
    alternative = f" AlternativeUserID={_attr(json.dumps(actor, sort_keys=True))}" if actor else ""
    head = (f"<ActiveParticipant UserID={_attr(user)}{alternative} UserIsRequestor=\"{str(requestor).lower()}\""
            f"{access}")
    if role is None:
        return head + "/>"
    return head + ">" + _code("RoleIDCode", *_ROLES[role]) + "</ActiveParticipant>"


def _text(value: str) -> str:
    return printable(value, TEXT_LIMIT).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _b64(value: Any) -> str:
    import base64

    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return base64.b64encode(text.encode()).decode()


def syslog_message(row: Mapping[str, Any], source_id: str, hostname: str, limit: int | None = None) -> bytes:
    """One RFC 5424 message: header, structured data with the chain (seq, hash, prev), then the audit
    message (UTF-8 with its BOM, as RFC 5424 asks of UTF-8 messages).

    Args:
        limit: the most bytes the message may have (a UDP datagram); a longer one is sent with its details
            and description replaced by a note that the whole event is on the node (RFC 5426 lets a sender
            shorten a message; this keeps it valid XML with the chain's hashes intact).
    """
    stamp = datetime.fromisoformat(row["time"]).isoformat(timespec="microseconds").replace("+00:00", "Z")
    sd = f"[{SD_ID} seq=\"{int(row['seq'])}\" hash=\"{row['hash']}\" prev=\"{row['prev_hash']}\"]"
    header = f"<{PRIORITY}>1 {stamp} {hostname[:255] or '-'} segnode {os.getpid()} IHE+RFC-3881 {sd} "
    head = header.encode("ascii", "replace") + b"\xef\xbb\xbf"
    message = head + audit_message(row, source_id).encode()
    size = len(message)
    if limit is not None and size > limit:
        objects = json.loads(row["objects"] or "{}")
        short = dict(row, objects=json.dumps({k: v for k, v in objects.items() if k in _OBJECT_IDS}), status=None,
                     detail=f"shortened for a datagram ({size} bytes); the whole event is on the node as "
                            f"audit sequence number {int(row['seq'])}")
        message = head + audit_message(short, source_id).encode()
        log.warning("ATNA: audit event %d is %d bytes, more than a UDP datagram holds; sent without its details "
                    "(the whole event stays on the node; TLS or TCP send it whole)", int(row["seq"]), len(message))
    return message


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
        self._sent_upto = self.cursor
        self._pending: deque[tuple[int, float]] = deque()  # (last seq of a batch, when sent): not yet confirmed
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
        stop_all([self], drain)

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
                self._stop.wait(0.2)
            except Exception as exc:  # noqa: BLE001 - the collector, the network or the database: retried
                if self._stop.is_set():
                    break
                if not isinstance(exc, OSError):
                    log.exception("ATNA destination %s: sending failed unexpectedly", self.dest.name)
                self._close()
                self._pending.clear()
                self._sent_upto = self.cursor  # unconfirmed: sent again on the next connection
                self._failed(exc)
                self._stop.wait(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
        self._close()

    def _step(self) -> bool:
        """Confirm what settled, send the next batch; True when more is waiting at once."""
        if self.dest.transport != "udp" and self._sock is not None:
            self._check_peer()
            self._confirm()
        head = self._durable_head()
        if head <= self._sent_upto:
            return False
        with self.engine.connect() as conn:
            rows = conn.execute(sql_select(AuditEvent.__table__).where(AuditEvent.seq > self._sent_upto,
                                                                       AuditEvent.seq <= head)
                                .order_by(AuditEvent.seq).limit(BATCH)).mappings().all()
        if not rows:
            return False
        limit = UDP_LIMIT if self.dest.transport == "udp" else None
        self._send([syslog_message(dict(r), self.source_id, self.hostname, limit) for r in rows])
        self._sent_upto = int(rows[-1]["seq"])
        if self.dest.transport == "udp":  # no connection to watch: sent is all a datagram can be
            self._write_cursor(self._sent_upto)
            self._recovered()
        else:
            self._pending.append((self._sent_upto, time.monotonic()))
        return len(rows) == BATCH

    def _confirm(self) -> None:
        """Move the cursor past every batch the collector's TCP acknowledged (nothing left in our send queue)
        and whose connection stayed open SETTLE s after it was sent. Syslog has no reply of its own: this is
        as far as a sender can tell that a collector has the messages."""
        if not self._pending or _unacknowledged(self._sock) > 0:
            return
        settled = 0
        now = time.monotonic()
        while self._pending and now - self._pending[0][1] >= SETTLE:
            settled = self._pending.popleft()[0]
        if settled:
            self._write_cursor(settled)
            self._recovered()

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

    def _check_peer(self) -> None:
        """Read what the collector sent, if anything: end of stream or a TLS alert (a refused client
        certificate) raises, with the alert's own words; other bytes are read and ignored (a syslog
        collector does not answer, and what it says is not ours to act on)."""
        sock = self._sock
        assert sock is not None
        for _ in range(16):  # bounded: a collector that keeps writing does not hold the thread
            if not select.select([sock], [], [], 0)[0]:
                return
            sock.settimeout(0)
            try:
                data = sock.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):  # TLS records without data (session tickets)
                return
            finally:
                sock.settimeout(self.dest.timeout)
            if not data:
                hint = ("; if it requires a client certificate, give this destination cert_file and key_file"
                        if self.dest.transport == "tls" and self.dest.cert_file is None else "")
                raise ConnectionResetError(f"the collector closed the connection{hint}")

    def _interrupt(self) -> None:
        """From another thread: end a send blocked on a collector that stopped reading."""
        sock = self._sock
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the TCP socket under TLS too
            except OSError:
                pass

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


def _unacknowledged(sock: socket.socket | None) -> int:
    """Bytes sent on `sock` its peer's TCP has not acknowledged yet (Linux SIOCOUTQ; 0 where unknown)."""
    if sock is None:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except OSError:
        return 0


def stop_all(shippers: list[Shipper], drain: float = 5.0) -> None:
    """Stop every shipper within about `drain` + 2 s whatever their collectors do: wait up to `drain` s
    together for what is on disk to be confirmed (not for destinations that are down), then stop them all,
    ending sends blocked on a collector that stopped reading. What is not confirmed is sent at the next start.
    """
    deadline = time.monotonic() + drain
    while time.monotonic() < deadline and any(
            s._thread.is_alive() and s.waiting() and s.down_since is None for s in shippers):
        time.sleep(0.05)
    for shipper in shippers:
        shipper._stop.set()
        shipper._interrupt()
    deadline = time.monotonic() + 2.0
    for shipper in shippers:
        if shipper._thread.is_alive():
            shipper._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if shipper._thread.is_alive():
            log.warning("ATNA destination %s: its thread did not stop in time (a connection attempt still "
                        "waiting); %d event(s) are sent at the next start", shipper.dest.name, shipper.waiting())
