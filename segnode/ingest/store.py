"""Commit received instances: spool file, index row and audit event, or a precise refusal.

Transport-agnostic: the DIMSE acceptor and the STOW-RS endpoint both hand a finished temp file
here. The index row and its audit event share one transaction, taken under the trail's lock so
duplicates racing from many associations resolve to exactly one stored copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import time
from collections import Counter
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import Engine, select

from segnode.audit import events as audit
from segnode.audit.trail import AuditTrail, patient_key
from segnode.config import StorageConfig
from segnode.db.fast import FastDB
from segnode.db.models import INSTANCES, SUPERSEDED, Instance, SupersededInstance
from segnode.dicom import status as st
from segnode.dicom.dataset import Identifiers, MalformedDataset, walk_dataset
from segnode.dicom.part10 import NotPart10, parse_meta
from segnode.dicom.uids import is_valid_uid
from segnode.metrics import INSTANCES_RECEIVED, RECEIVED_BYTES, STAGE_SECONDS
from segnode.flow import StoreOutcome, StoreResult, utc_now
from segnode.db.walsync import WalSync
from segnode.ingest.spool import Spool, SpoolWriter

log = logging.getLogger(__name__)


class _NotDurable(Exception):
    """The temp file's fsync failed (`error`): the caller refuses the instance with 0xA700."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _made_durable(durable: Callable[[], None] | None) -> None:
    """Wait for `durable` (see `StoreService.commit`); raises _NotDurable when its fsync failed."""
    if durable is not None:
        try:
            durable()
        except OSError as exc:
            raise _NotDurable(exc) from exc


def _unplace(tmp_path: Path, placed: Path) -> None:
    """Undo `Spool.place` of a new instance whose commit failed: the file goes if it was renamed (its
    directory's fsync, or the commit, failed after)."""
    if not tmp_path.exists():
        placed.unlink(missing_ok=True)


@dataclass
class _Row:
    id: int
    sha256: str
    path: str
    version: int


@dataclass(frozen=True)
class Peer:
    """Who sent it: enough for the audit trail, nothing about the patient.

    `host` is the peer's IP address as the socket reports it, `port` its (ephemeral) TCP port, 0 when
    unknown; `user` is the HTTP caller ("bearer" when a token was checked).
    """

    protocol: str  # "dimse", "stow", "http", "recovery" or "local"
    host: str
    port: int = 0
    _: KW_ONLY  # the AE titles and the user are named at every call: they are easily swapped
    ae_title: str = ""
    called_ae_title: str = ""
    user: str = ""

    def actor(self) -> dict[str, Any]:
        """The audit event's actor: the non-empty fields by name (JSON-ready)."""
        return {k: v for k, v in self.__dict__.items() if v}

    def label(self) -> str:
        """'protocol:[AE@]host:port', e.g. 'dimse:CT1@10.0.0.5:40112': the index's `source` column, which
        segnode.routing.router.sender parses back into the rules' AE title and IP."""
        who = f"{self.ae_title}@" if self.ae_title else ""
        return f"{self.protocol}:{who}{self.host}:{self.port}"

    def record(self) -> bytes:
        """This peer as compact JSON (UTF-8), kept with each spool file it sent (spool.SENDER_XATTR)."""
        return json.dumps(self.__dict__, separators=(",", ":")).encode()

    @classmethod
    def from_record(cls, data: bytes) -> "Peer | None":
        """The peer `record` wrote; None when `data` is empty or not such a record."""
        try:
            fields = json.loads(data)
            return cls(str(fields["protocol"]), str(fields["host"]), int(fields["port"]),
                       ae_title=str(fields["ae_title"]), called_ae_title=str(fields["called_ae_title"]),
                       user=str(fields["user"]))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass
class RefusalTally:
    """The refusals of one association or one request: the first of each status is audited and logged in
    full, the others only counted, and `StoreService.summarize` writes them as one event when it ends
    (a request of 10,000 empty parts wrote 10,000 events)."""

    counts: Counter[int] = field(default_factory=Counter)
    examples: dict[int, list[str]] = field(default_factory=dict)  # a few instance UIDs per status

    def first(self, result: StoreResult) -> bool:
        """Count `result`; True when it is the first of its status here (audit it in full)."""
        self.counts[result.status] += 1
        if self.counts[result.status] == 1:
            return True
        uids = self.examples.setdefault(result.status, [])
        if len(uids) < 5 and result.sop_instance_uid and is_valid_uid(result.sop_instance_uid):
            uids.append(result.sop_instance_uid)
        return False

    @property
    def unaudited(self) -> int:
        return sum(n - 1 for n in self.counts.values())


@dataclass(kw_only=True)
class Received:
    """A finished temp file holding our file meta followed by the received dataset (which starts
    `dataset_offset` bytes in, encoded in `transfer_syntax_uid`); `sha256` (of the whole file) and `ids`
    are filled in by `identify`."""

    tmp_path: Path
    size: int
    transfer_syntax_uid: str
    dataset_offset: int
    sha256: str = ""
    ids: Identifiers = field(default_factory=Identifiers)
    recoverable: bool = False  # the file records its sender: recovery can rebuild its index row


def _walk_file(rec: Received, max_inflated: int, hash_file: bool) -> str | None:
    """Walk the dataset through a read-only mapping (no copy, any size), hashing the file first when
    `hash_file`; return the problem, if any."""
    error: str | None = None
    with open(rec.tmp_path, "rb") as f:
        if os.fstat(f.fileno()).st_size <= rec.dataset_offset:
            return "the dataset is empty"
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            if hash_file:
                rec.sha256 = hashlib.sha256(mm).hexdigest()
            rec.ids = walk_dataset(memoryview(mm)[rec.dataset_offset:], rec.transfer_syntax_uid, max_inflated,
                                   rec.tmp_path.parent)
        except (MalformedDataset, ValueError) as exc:
            error = str(exc)  # the traceback (and its views into mm) dies with this block
        mm.close()
    return error


class StoreService:
    """The one place received instances are committed or refused, for every transport.

    Args:
        engine: the database holding the index and the audit trail.
        spool: where files are placed (its data directory's spool/, tmp/ and superseded/).
        trail: the audit trail; its lock serializes commits with every other appender.
        patient_secret: key of the patient-identity hashes (see `patient_key`).
        storage: the free-space floor (refuse instances) and watermark (refuse associations), in MB.
    """

    def __init__(self, engine: Engine, spool: Spool, trail: AuditTrail, patient_secret: bytes,
                 storage: StorageConfig) -> None:
        self.engine, self.spool, self.trail = engine, spool, trail
        self.db = FastDB(engine)
        self.secret = patient_secret
        self.floor_mb, self.watermark_mb = storage.free_space_floor_mb, storage.free_space_watermark_mb
        self.sop_classes = storage.sop_classes  # which SOP classes are stored (negotiation, STOW parts)
        self.max_inflated = storage.max_inflated_mb * 2**20  # a deflated dataset inflates to at most this
        # New instances' index commits are flushed a moment later, grouped (segnode.db.walsync): recovery
        # rebuilds them from their fsynced files. SQLite with fsync on only; PostgreSQL commits as configured.
        self.wal_sync: WalSync[tuple[int, str] | None] | None = None
        if self.db.sqlite and spool.fsync and engine.url.database not in (None, "", ":memory:"):
            self.wal_sync = WalSync(Path(str(engine.url.database)), trail.take_deferred, trail.anchor)

    def open_writer(self, peer: Peer) -> SpoolWriter:
        """A temp file for a dataset `peer` is sending, recording the sender with it (see `commit`).

        Raises:
            OSError: it cannot be created (e.g. ENOSPC): refuse with 0xA700.
        """
        return self.spool.writer(peer.record())

    def close(self) -> None:
        """Flush what is deferred and stop the flushing thread; call before the trail is closed."""
        if self.wal_sync is not None:
            self.wal_sync.close()
            self.wal_sync = None
        self.db.close()

    # -- checks -------------------------------------------------------------------------------
    def below_floor(self) -> bool:
        """True when the spool's file system has less free space than the floor: refuse the instance
        (0xA700 over DIMSE, 503 over STOW-RS when every part is refused)."""
        return self.spool.free_mb() < self.floor_mb

    def disk_not_ready(self) -> str | None:
        """None while free space is at or above the watermark, else the readiness reason."""
        free = self.spool.free_mb()
        if free < self.watermark_mb:
            return (f"disk: {free:.0f} MB free, under storage.free_space_watermark_mb ({self.watermark_mb}); new "
                    "associations are refused: free space in the data directory")
        return None

    def below_watermark(self) -> bool:
        """True when free space is below the watermark: refuse new associations (A-ASSOCIATE-RJ,
        transient), letting the ones under way finish above the floor."""
        return self.spool.free_mb() < self.watermark_mb

    def receive(self, writer: SpoolWriter, rec: Received, peer: Peer, expected_class: str = "",
                expected_instance: str = "", tally: RefusalTally | None = None,
                check: Callable[[Received], StoreResult | None] | None = None) -> StoreResult:
        """Store or refuse a dataset a transport has written in full: the one path of DIMSE and STOW-RS.

        The temp file was hashed while it arrived; it is fsynced on a helper thread while it is walked
        here and its index row and audit event are written (uncommitted, see `commit`), and placed and
        committed only once it is durable: "acknowledged" still means durable and indexed.

        Args:
            writer: the temp file's writer, every byte written (finished here).
            rec: its transfer syntax and dataset offset (`tmp_path` is the writer's).
            peer: the sender.
            expected_class, expected_instance: what the sender announced (see `identify`).
            tally: the association's or request's refusals (see `refuse`).
            check: a transport's own check once the dataset is identified (STOW-RS: the study in the URL).

        Returns:
            The result to answer with: success, or the refusal (audited): 0xA700 when fsync fails.
        """
        started = time.perf_counter()
        rec.recoverable = writer.sender_recorded
        durable = writer.finish()  # fsync, hash and walk run at once: the slowest alone is on the path
        refusal = self.identify(rec, expected_class, expected_instance, hashed=True)
        if refusal is None and check is not None:
            refusal = check(rec)
        try:
            rec.sha256 = writer.hash.hexdigest()
        except RuntimeError as exc:  # the helper thread failed: nothing is known about these bytes
            log.error("hashing a received dataset failed (%s); answered 0xA700", exc.__cause__)
            refusal = StoreResult.refused(st.OUT_OF_RESOURCES, "hashing the dataset failed",
                                          sop_class_uid=expected_class, sop_instance_uid=expected_instance)
        if refusal is None:
            def made_durable() -> None:
                durable.result()
                writer.close()

            try:
                result = self.commit(rec, peer, durable=made_durable)
            except _NotDurable as exc:
                refusal = StoreResult.refused(st.OUT_OF_RESOURCES, f"fsync failed: {exc.error.strerror}",
                                              sop_class_uid=expected_class, sop_instance_uid=expected_instance)
        else:
            try:
                durable.result()
            except OSError:
                pass
        if refusal:
            writer.abort()
            return self.refuse(peer, refusal, rec, tally=tally)
        if result.status == st.SUCCESS:
            INSTANCES_RECEIVED.labels(peer.protocol, "0000").inc()
            RECEIVED_BYTES.labels(peer.protocol).inc(rec.size)
            STAGE_SECONDS.labels("receive").observe(time.perf_counter() - started)
        return result

    def identify(self, rec: Received, expected_class: str = "", expected_instance: str = "",
                 hashed: bool = False) -> StoreResult | None:
        """Walk the temp file's dataset and check its identifiers; fills in `rec.ids` (and `rec.sha256`, of the
        whole file, unless the caller hashes it: `hashed`).

        Must pass before `commit`: it is what makes the UIDs safe to use as spool paths.

        Args:
            rec: the finished temp file.
            expected_class: the SOP Class UID the sender announced (C-STORE command, STOW part's meta);
                "" to skip the comparison.
            expected_instance: likewise, the SOP Instance UID.

        Returns:
            None when the instance may be committed, else the refusal to pass to `refuse`: 0xC210 the
            dataset does not parse, 0xC211 a SOP Class/Instance, Study or Series UID is missing, 0xC212
            one is not a valid UID, 0xA900 the dataset's SOP Class/Instance UID differs from the
            announced one.
        """
        error = _walk_file(rec, self.max_inflated, hash_file=not hashed)
        if error is not None:
            return StoreResult.refused(st.CANNOT_UNDERSTAND, f"not a complete DICOM dataset: {error}",
                          sop_class_uid=expected_class, sop_instance_uid=expected_instance)
        ids = rec.ids
        for name in ("sop_instance_uid", "sop_class_uid", "study_uid", "series_uid"):
            value = getattr(ids, name)
            if not value:
                return StoreResult.refused(st.MISSING_IDENTIFIER, f"{name} is missing", sop_class_uid=ids.sop_class_uid, sop_instance_uid=expected_instance)
            if not is_valid_uid(value):
                return StoreResult.refused(st.INVALID_UID, f"{name} is not a valid UID", sop_class_uid=ids.sop_class_uid,
                              sop_instance_uid=expected_instance if is_valid_uid(expected_instance) else "")
        if expected_instance and ids.sop_instance_uid != expected_instance:
            return StoreResult.refused(st.DATASET_MISMATCH, "SOP Instance UID differs from the command's",
                          sop_class_uid=ids.sop_class_uid, sop_instance_uid=expected_instance)
        if expected_class and ids.sop_class_uid != expected_class:
            return StoreResult.refused(st.DATASET_MISMATCH, "SOP Class UID differs from the command's",
                          sop_class_uid=ids.sop_class_uid, sop_instance_uid=expected_instance)
        return None

    # -- outcomes -------------------------------------------------------------------------------
    def refuse(self, peer: Peer, result: StoreResult, rec: Received | None = None, objects: dict[str, Any] | None = None,
               tally: RefusalTally | None = None) -> StoreResult:
        """Record a refused instance: drop its temp file, audit, log what to do.

        A failure to write the audit event is logged, not raised: the sender must still get its status.

        Args:
            peer: the sender.
            result: the refusal (from `identify`, a transport's own checks, or a failed commit).
            rec: the temp file, deleted here; None when nothing was written.
            objects: extra audit objects; valid SOP Instance and Study UIDs are added.
            tally: the association's or request's refusals: a status it has seen before is only counted
                (see `summarize`).

        Returns:
            `result`, unchanged, for the caller to answer with.
        """
        if rec is not None:
            rec.tmp_path.unlink(missing_ok=True)
        INSTANCES_RECEIVED.labels(peer.protocol, f"{result.status:04X}").inc()
        if tally is not None and not tally.first(result):
            return result
        objs = dict(objects or {})
        if result.sop_instance_uid and is_valid_uid(result.sop_instance_uid):
            objs.setdefault("sop_instance_uid", result.sop_instance_uid)
        if rec is not None and rec.ids.study_uid and is_valid_uid(rec.ids.study_uid):
            objs.setdefault("study_uid", rec.ids.study_uid)
        try:
            self.record(audit.Event(type=audit.INSTANCES_TRANSFERRED, action=audit.Action.CREATE,
                                    outcome=audit.Outcome.SERIOUS_FAILURE, actor=peer.actor(), objects=objs,
                                    status=result.status, detail=result.comment))
        except Exception:  # the sender still gets its status; the operator gets the reason
            log.exception("could not write the audit event for a refused instance; check the database")
        log.warning("refused an instance from %s: status 0x%04X, %s. %s", peer.label(), result.status, result.comment,
                    st.HINTS.get(result.status, ""))
        return result

    def summarize(self, peer: Peer, tally: RefusalTally, scope: str) -> None:
        """One audit event (and log line) for the refusals `tally` only counted, if any: how many of each
        status and a few of their instance UIDs. Logged, not raised, when it cannot be written.

        Args:
            scope: what they happened in, for the detail ("association", "STOW-RS request").
        """
        if not tally.unaudited:
            return
        suppressed = {f"0x{status:04X}": n - 1 for status, n in sorted(tally.counts.items()) if n > 1}
        counts = ", ".join(f"{status} x{n}" for status, n in suppressed.items())
        detail = f"{tally.unaudited} more instances refused in this {scope} ({counts}); the first of each status " \
                 f"was recorded in full"
        examples = {f"0x{status:04X}": uids for status, uids in tally.examples.items() if uids}
        log.warning("refused %d more instances from %s: %s", tally.unaudited, peer.label(), counts)
        try:
            self.record(audit.Event(type=audit.INSTANCES_TRANSFERRED, action=audit.Action.CREATE,
                                    outcome=audit.Outcome.SERIOUS_FAILURE, actor=peer.actor(),
                                    objects={"refused": suppressed, "examples": examples}, detail=detail))
        except Exception:
            log.exception("could not write the audit event summarizing refused instances; check the database")

    def record_security(self, peer: Peer, detail: str) -> None:
        """Log and audit a security alert (e.g. a wrong bearer token); database errors propagate."""
        log.warning("security: %s from %s", detail, peer.label())
        self.record(audit.Event(type=audit.SECURITY_ALERT, action=audit.Action.EXECUTE,
                                outcome=audit.Outcome.SERIOUS_FAILURE, actor=peer.actor(), detail=detail))

    def record(self, event: audit.Event) -> None:
        """Append one audit event in its own transaction.

        Raises:
            Exception: the DBAPI's error (sqlite3, psycopg) when the event cannot be written.
        """
        with self.trail.lock:
            try:
                with self.db.transaction() as tx:
                    self.trail.append(tx, event)
            except Exception:
                self.trail.rolled_back()
                raise
            self.trail.committed()

    def commit(self, rec: Received, peer: Peer, note: str = "",
               durable: Callable[[], None] | None = None) -> StoreResult:
        """Place the file, index it and audit it; idempotent for identical bytes.

        Identical bytes for a known SOP Instance UID: DUPLICATE, temp file dropped, nothing written
        but the audit event. Different bytes: OVERWRITTEN, the old file moved to superseded/ and the
        index row's version incremented. The file moves are undone if the transaction fails, so what
        was not acknowledged leaves no file behind.

        Durability on return: the file and its name are fsynced before the index row commits. A new
        instance whose file records its sender (`rec.recoverable`) commits without flushing the
        database (SQLite): `wal_sync` flushes it a moment later, with its neighbours; a power loss
        before that loses the row and its audit event, and `reconcile` rebuilds both from the file at
        the next start. Duplicates and overwrites, which no file can rebuild, are flushed before return.

        Args:
            rec: a temp file that passed `identify` (its `ids` are the spool path).
            peer: the sender, recorded as the row's `source` and the event's actor.
            note: appended to the audit event's detail (recovery says so).
            durable: waits until the temp file is durable, raising the OSError of a failed fsync; None when it
                already is. A new instance's index row and audit event are written first (uncommitted), while
                the fsync runs; nothing is moved, and nothing commits, before it returns.

        Returns:
            Success (status 0x0000) with the outcome, or a refusal 0xA700 when the database or the disk
            failed (already audited and logged via `refuse`).

        Raises:
            ValueError: `rec.ids` holds an invalid UID, i.e. `identify` was skipped.
            _NotDurable: `durable` raised: nothing was moved or committed; the caller refuses (0xA700).
        """
        ids = rec.ids
        relative = self.spool.relative_path(ids.study_uid, ids.series_uid, ids.sop_instance_uid)
        objects = {"study_uid": ids.study_uid, "series_uid": ids.series_uid,
                   "sop_instance_uid": ids.sop_instance_uid, "sop_class_uid": ids.sop_class_uid, "sha256": rec.sha256}
        now = utc_now()
        pkey = patient_key(self.secret, ids.patient_id, ids.issuer_of_patient_id)
        deferred = self.wal_sync is not None and rec.recoverable
        with self.trail.lock:
            undo: list[Callable[[], object]] = []  # file moves to reverse if the transaction fails
            try:
                with self.db.transaction(deferred=deferred) as tx:
                    found = tx.first(INSTANCES, ("id", "sha256", "path", "version"), "sop_instance_uid",
                                     ids.sop_instance_uid)
                    row = _Row(*found) if found else None
                    if row is not None and row.sha256 == rec.sha256:
                        outcome, action, detail = StoreOutcome.DUPLICATE, audit.Action.READ, "duplicate: identical bytes already stored"
                    else:
                        values = dict(sop_class_uid=ids.sop_class_uid, study_uid=ids.study_uid,
                                      series_uid=ids.series_uid, modality=ids.modality[:16],
                                      instance_number=ids.instance_number, transfer_syntax_uid=rec.transfer_syntax_uid,
                                      path=relative, sha256=rec.sha256, size=rec.size, patient_key=pkey,
                                      source=peer.label()[:200], received_at=now)
                        if row is None:  # the file is placed below, once durable
                            tx.insert(INSTANCES, dict(values, sop_instance_uid=ids.sop_instance_uid, version=1))
                            outcome, action, detail = StoreOutcome.STORED, audit.Action.CREATE, ""
                        else:
                            _made_durable(durable)
                            aside = self.spool.set_aside(row.path, ids.sop_instance_uid, row.version, row.sha256)
                            if not aside.startswith("missing:"):
                                undo.append(lambda: os.replace(self.spool.root / aside, self.spool.root / row.path))
                            placed = self.spool.place(rec.tmp_path, relative)
                            undo.append(lambda: placed.unlink(missing_ok=True))
                            tx.insert(SUPERSEDED, dict(sop_instance_uid=ids.sop_instance_uid, version=row.version,
                                                       path=aside, sha256=row.sha256, superseded_at=now))
                            tx.update(INSTANCES, row.id, dict(values, version=row.version + 1))
                            outcome, action = StoreOutcome.OVERWRITTEN, audit.Action.UPDATE
                            detail = f"overwrite: version {row.version} (sha256 {row.sha256}) kept at {aside}"
                            objects["superseded_sha256"] = row.sha256
                    self.trail.append(tx, audit.Event(type=audit.INSTANCES_TRANSFERRED, action=action,
                                                      outcome=audit.Outcome.SUCCESS, actor=peer.actor(),
                                                      objects=dict(objects, patient_key=pkey), status=st.SUCCESS,
                                                      detail="; ".join(d for d in (detail, note) if d)))
                    if outcome == StoreOutcome.DUPLICATE:
                        _made_durable(durable)
                        rec.tmp_path.unlink(missing_ok=True)
                    elif outcome == StoreOutcome.STORED:
                        _made_durable(durable)  # the statements above ran meanwhile
                        undo.append(lambda: _unplace(rec.tmp_path, self.spool.root / relative))
                        self.spool.place(rec.tmp_path, relative)  # durable before the row that names it commits
            except Exception as exc:
                self.trail.rolled_back()
                for step in reversed(undo):  # not indexed, not acknowledged: leave no orphan, restore the old
                    try:
                        step()
                    except OSError:
                        log.exception("could not undo a file move after a failed commit")
                if not isinstance(exc, _NotDurable):
                    try:  # a failure before the wait: a failed fsync still answers as a failed fsync
                        _made_durable(durable)
                    except _NotDurable as not_durable:
                        exc = not_durable
                if isinstance(exc, _NotDurable):
                    raise exc
                rec.tmp_path.unlink(missing_ok=True)
                log.exception("storing an instance failed; answered 0xA700. Check the database and the disk.")
                return self.refuse(peer, StoreResult.refused(st.OUT_OF_RESOURCES, f"storage failed: {type(exc).__name__}",
                                                sop_class_uid=ids.sop_class_uid, sop_instance_uid=ids.sop_instance_uid))
            if deferred and outcome != StoreOutcome.STORED:  # no file could rebuild this commit: flush it now
                assert self.wal_sync is not None
                try:
                    self.wal_sync.flush()
                except OSError as exc:
                    self.trail.committed(durable=False)
                    log.exception("could not flush the index after storing an instance; answered 0xA700")
                    return self.refuse(peer, StoreResult.refused(
                        st.OUT_OF_RESOURCES, f"index flush failed: {exc.strerror}", sop_class_uid=ids.sop_class_uid,
                        sop_instance_uid=ids.sop_instance_uid))
                deferred = False
            self.trail.committed(durable=not deferred)
        if deferred:
            assert self.wal_sync is not None
            self.wal_sync.soon()
        if outcome == StoreOutcome.OVERWRITTEN:
            log.warning("instance %s replaced by different bytes from %s; old version kept aside",
                        ids.sop_instance_uid, peer.label())
        return StoreResult.success(outcome, sop_class_uid=ids.sop_class_uid, sop_instance_uid=ids.sop_instance_uid)

    # -- recovery -------------------------------------------------------------------------------
    def reconcile(self) -> int:
        """Index spool files a crash left unindexed (placed, not yet committed); drop temp files.

        A temp file was never acknowledged, so it goes. A placed file without an index row was left
        by a commit that crashed (never acknowledged) or by an acknowledged commit whose flush a power
        loss overtook (see `commit`); it cannot tell which, so it is validated and indexed, under the
        sender its file records (the row's `source` the rules route by, the event's actor), else as
        "recovery". A spool file
        without file meta is moved to superseded/unreadable.<name>; one that fails `identify` is
        refused and deleted. Run once at start, before any listener accepts.

        Returns:
            How many spool files were indexed (duplicates included).
        """
        dropped = self.spool.clean_tmp()
        peer = Peer("recovery", "localhost")
        restored = self._restore_interrupted_overwrites(peer)
        with self.engine.connect() as conn:
            known = set(conn.execute(select(Instance.path)).scalars())
        recovered = 0
        for path in sorted(self.spool.objects.rglob("*.dcm")):
            relative = path.relative_to(self.spool.root).as_posix()
            if relative in known:
                continue
            with open(path, "rb") as f:
                try:
                    meta = parse_meta(f.read(65536))
                except NotPart10:
                    meta = None
                if meta is not None and not meta.transfer_syntax_uid:  # ours always name it
                    meta = None
            if meta is None:  # not ours to judge: keep it aside, never delete it
                os.replace(path, self.spool.superseded / f"unreadable.{path.name}")
                self.refuse(peer, StoreResult.refused(st.CANNOT_UNDERSTAND, f"spool file {relative} has no file meta; "
                                                          "kept in superseded/"))
                continue
            tmp = self.spool.tmp / f"recover.{path.name}"
            os.replace(path, tmp)
            rec = Received(tmp_path=tmp, size=tmp.stat().st_size,
                           transfer_syntax_uid=meta.transfer_syntax_uid, dataset_offset=meta.dataset_offset)
            refusal = self.identify(rec)
            sender = Peer.from_record(self.spool.sender(tmp))
            result = self.refuse(peer, refusal, rec) if refusal else self.commit(
                rec, sender or peer, note="indexed by start-up recovery: the file was placed, its index row "
                                          "was not on disk (a crash or power loss came between)")
            recovered += result.status == st.SUCCESS
        if dropped or recovered or restored:
            log.info("start-up recovery: %d partial temp files removed, %d spool files indexed, %d versions "
                     "restored from an interrupted overwrite", dropped, recovered, restored)
        return recovered

    def _restore_interrupted_overwrites(self, peer: Peer) -> int:
        """Undo overwrites a crash cut short. An overwrite moves the indexed version to
        superseded/<uid>.v<version>.<sha256[:16]>.dcm and renames the new bytes into its place before its
        transaction commits; a crash between left the index naming the old version while its path held
        bytes never acknowledged (or nothing). A superseded file with no superseded row, whose version and
        hash are still the index row's, is that old version: it goes back, the unacknowledged bytes go.

        Returns:
            How many versions were restored (each audited).
        """
        candidates = []
        with self.engine.connect() as conn:  # read first: `record` below takes the write lock itself
            recorded = set(conn.execute(select(SupersededInstance.path)).scalars())
            for aside in sorted(self.spool.superseded.glob("*.v*.dcm")):
                parsed = self.spool.parse_aside(aside.name)
                if f"superseded/{aside.name}" in recorded or parsed is None:
                    continue
                uid, version, sha16 = parsed
                row = conn.execute(select(Instance).where(Instance.sop_instance_uid == uid)).first()
                if row is not None and row.version == version and row.sha256.startswith(sha16):
                    candidates.append((aside, row.sop_instance_uid, row.study_uid, row.sha256, row.version, row.path))
        restored = 0
        for aside, uid, study, sha, version, path in candidates:
            target = self.spool.root / path
            if target.exists():
                with open(target, "rb") as f:
                    if hashlib.file_digest(f, "sha256").hexdigest() == sha:
                        continue  # the indexed bytes are in place after all
                target.unlink()  # the new bytes of an overwrite that never committed: never acknowledged
            os.replace(aside, target)
            self.spool.sync_dir(target.parent)
            restored += 1
            self.record(audit.Event(type=audit.INSTANCES_TRANSFERRED, action=audit.Action.UPDATE,
                                    outcome=audit.Outcome.MINOR_FAILURE, actor=peer.actor(),
                                    objects={"sop_instance_uid": uid, "study_uid": study, "sha256": sha,
                                             "version": version},
                                    detail=f"an overwrite was cut short by a crash: version {version} restored "
                                           f"from superseded/{aside.name}, the unacknowledged new bytes removed"))
            log.warning("start-up recovery: an overwrite of an instance was cut short by a crash; the indexed "
                        "version was restored from superseded/%s", aside.name)
        return restored
