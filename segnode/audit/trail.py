"""Append-only, hash-chained audit events.

Each event's hash covers its content and the previous event's hash, so an edited, deleted,
inserted or reordered event breaks the chain at a point `verify` can name. The sequence number is
left out of the hash on purpose: renumbering to hide a deletion or an insertion does not hide the
broken link, and the report points at the event where the chain breaks, not at every later one.
What an event says is typed in segnode.audit.events.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import Connection, select

from segnode.audit.events import Event
from segnode.flow import utc_now
from segnode.db.fast import Tx
from segnode.db.models import AUDIT_EVENTS as TABLE


GENESIS = "0" * 64
APPEND_LOCK = 0x5E6A0D17  # PostgreSQL advisory lock key held while an event is appended

def patient_key(secret: bytes, patient_id: str, issuer: str = "") -> str:
    """Keyed hash of the patient identity: linkable inside this node, not reversible outside it.

    Args:
        secret: the node's key (segnode.service.load_secret), so that a dictionary of patient IDs
            hashed elsewhere does not reverse it.
        patient_id: Patient ID (0010,0020); "" gives "".
        issuer: Issuer of Patient ID (0010,0021): the same ID from two issuers is two patients.

    Returns:
        32 hex characters (the first 128 bits of HMAC-SHA256), or "" without a Patient ID.
    """
    if not patient_id:
        return ""
    return hmac.new(secret, f"{issuer}\x00{patient_id}".encode(), hashlib.sha256).hexdigest()[:32]


def _digest(row: dict[str, Any]) -> str:
    body = {k: row[k] for k in ("time", "event_id", "event_name", "action", "outcome", "status",
                                "actor", "objects", "detail", "prev_hash")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class HeadAnchor:
    """The newest event's sequence number and hash, kept in a file beside the database.

    The chain alone cannot show that its last events were deleted; the anchor can. One pwrite
    per event (no fsync: after a power loss the anchor may lag the fsynced database, never lead
    it). Someone able to rewrite both the table and this file defeats it; exporting events off
    the machine (ATNA) is the answer to that.
    """

    SIZE = 100  # bytes: "<seq> <sha256 hex>", space-padded, newline-terminated

    def __init__(self, path: Path) -> None:
        """Open (create, mode 0640) the anchor file; keep it open for `write`.

        Raises:
            OSError: the file cannot be opened.
        """
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)

    def write(self, seq: int, digest: str) -> None:
        """Advance the anchor to event `seq` with hash `digest`; never move it back (processes commit
        and then write in either order). An exclusive flock serializes the processes sharing the file."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            current = os.pread(self._fd, self.SIZE, 0).split()
            if current and current[0].isdigit() and int(current[0]) >= seq:
                return
            os.pwrite(self._fd, f"{seq} {digest}".ljust(self.SIZE - 1).encode() + b"\n", 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the file; `write` must not be called afterwards."""
        os.close(self._fd)

    @staticmethod
    def read(path: Path) -> tuple[int, str] | None:
        """The anchored (sequence number, hash), or None when the file is missing or empty.

        Raises:
            ValueError: the file does not hold "<seq> <hash>" (it was damaged or edited).
        """
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return None
        if not text:
            return None
        seq, digest = text.split()
        return int(seq), digest


class AuditTrail:
    """Appends events inside the caller's transaction; one writer at a time keeps the chain linear.

    Protocol: hold `lock`, open a transaction, `append`, commit, then `committed()` (or `rolled_back()`
    on failure) - see Ledger.transaction and StoreService.record. `lock` (reentrant) serializes this
    process's threads, whose pending head is kept in one slot; other processes are serialized by the
    database (see `append`).

    Args:
        anchor: the head anchor file (data directory's audit head); None: no anchor.
    """

    def __init__(self, anchor: Path | None = None) -> None:
        self.lock = threading.RLock()
        self._pending: tuple[int, str] | None = None
        self._deferred: tuple[int, str] | None = None  # newest head committed but not yet known on disk
        self._deferred_lock = threading.Lock()
        self._anchor = HeadAnchor(anchor) if anchor is not None else None

    def append(self, tx: Tx, event: Event) -> int:
        """Write `event` in `tx`; the caller holds `self.lock` until commit, then calls `committed()`.

        The head is read inside the transaction, never cached: other processes (completion, router,
        workers) append to the same chain. SQLite transactions hold the write lock from their start;
        on PostgreSQL an advisory lock serializes appenders until commit.

        Returns:
            The event's sequence number (1 for the first event).
        """
        if not tx.db.sqlite:
            tx.cursor.execute("SELECT pg_advisory_xact_lock(%s)" % APPEND_LOCK)
        head = tx.last(TABLE, ("seq", "hash"), "seq")
        seq, prev = (head[0], head[1]) if head else (0, GENESIS)
        row: dict[str, Any] = {
            "seq": seq + 1,
            "time": utc_now(),
            "event_id": event.type.code,
            "event_name": event.type.display,
            "action": str(event.action),
            "outcome": int(event.outcome),
            "status": event.status,
            "actor": json.dumps(dict(event.actor), sort_keys=True, separators=(",", ":")),
            "objects": json.dumps(dict(event.objects), sort_keys=True, separators=(",", ":")),
            "detail": event.detail,
            "prev_hash": prev,
        }
        row["hash"] = _digest(row)
        tx.insert(TABLE, row)
        self._pending = (row["seq"], row["hash"])
        return row["seq"]

    def committed(self, durable: bool = True) -> None:
        """Record the new head in the anchor once the transaction holding the append has committed.

        Args:
            durable: the commit is on disk (synchronous=FULL, or PostgreSQL). False for a deferred commit
                (segnode.db.walsync): its head is anchored once the WAL is flushed (`take_deferred`, `anchor`), so that the
                anchor never leads the database after a power loss.
        """
        head = getattr(self, "_pending", None)
        self._pending = None
        if self._anchor is None or head is None:
            return
        if durable:
            self._anchor.write(*head)
        else:
            with self._deferred_lock:
                if self._deferred is None or head[0] > self._deferred[0]:
                    self._deferred = head

    def take_deferred(self) -> tuple[int, str] | None:
        """The newest deferred head, forgotten here: call it before flushing the WAL, and `anchor` it after
        (a commit made while the flush runs stays deferred for the next one)."""
        with self._deferred_lock:
            head, self._deferred = self._deferred, None
        return head

    def anchor(self, head: tuple[int, str] | None) -> None:
        """Advance the anchor to `head` (from `take_deferred`), now known to be on disk."""
        if head is not None and self._anchor is not None:
            self._anchor.write(*head)

    def close(self) -> None:
        """Close the anchor file."""
        if self._anchor is not None:
            self._anchor.close()

    def rolled_back(self) -> None:
        """Forget the pending head: the transaction holding the append did not commit."""
        self._pending = None


@dataclass
class VerifyResult:
    """`verify`'s answer: `ok` when no problem was found; `count` events read; `problems` in chain
    order, each naming the event(s); `anchored` when a head anchor was compared."""

    ok: bool
    count: int
    problems: list[str]
    anchored: bool = False


def verify(rows: Iterable[Any], anchor: tuple[int, str] | None = None) -> VerifyResult:
    """Walk the chain and name every event that was edited, deleted, inserted or reordered;
    with the head anchor, also events deleted from the end.

    Args:
        rows: audit_events rows (SQLAlchemy Row, with `_mapping`), in sequence order.
        anchor: (seq, hash) from HeadAnchor.read; None: the end of the trail is not checked.

    Returns:
        The result; it never raises for a damaged chain, it reports it.
    """
    problems: list[str] = []
    anchored_hash: str | None = None  # the stored hash of the event the anchor names
    prev_hash, expected_seq, count = GENESIS, 1, 0
    for ev in rows:
        count += 1
        row = dict(ev._mapping)
        if ev.seq != expected_seq:
            if ev.seq > expected_seq:
                problems.append(f"events {expected_seq}..{ev.seq - 1} are missing (deleted)")
            else:
                problems.append(f"event {ev.seq} is out of order or duplicated")
        if _digest(row) != ev.hash:
            problems.append(f"event {ev.seq} was edited: its content does not match its hash")
        elif ev.prev_hash != prev_hash:
            problems.append(
                f"event {ev.seq} does not follow the event before it (an event was inserted or deleted before it)"
            )
        prev_hash, expected_seq = ev.hash, ev.seq + 1
        if anchor is not None and ev.seq == anchor[0]:
            anchored_hash = ev.hash
    if anchor is not None:
        last = expected_seq - 1
        if anchor[0] > last:
            problems.append(f"events {last + 1}..{anchor[0]} are missing (deleted from the end of the trail)")
        elif anchored_hash is not None and anchored_hash != anchor[1]:
            problems.append(f"event {anchor[0]} does not match the recorded head of the trail")
    return VerifyResult(ok=not problems, count=count, problems=problems, anchored=anchor is not None)


def verify_connection(conn: Connection, anchor_path: Path | None = None) -> VerifyResult:
    """`verify` over the whole audit_events table, with the anchor file when one is given.

    Raises:
        ValueError: the anchor file is damaged (see HeadAnchor.read).
    """
    anchor = HeadAnchor.read(anchor_path) if anchor_path is not None else None
    return verify(conn.execute(select(TABLE).order_by(TABLE.c.seq)), anchor)
