"""Durable ingest with one flush on the critical path: the file is fsynced before its index row commits, a
new instance's row is flushed a moment later (grouped), and what a power loss takes from the database is
rebuilt from the file under the sender it recorded. Acknowledged still means durable and indexed."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading

import pytest
from sqlalchemy import select

from segnode.audit.trail import AuditTrail, HeadAnchor, verify_connection
from segnode.db.models import Instance
from segnode.ingest import spool
from segnode.ingest.spool import SENDER_XATTR, BackgroundHash
from segnode.service import Node
from tests.conftest import audit_events, eventually, instances, make_settings, storescu


def test_the_background_hash_is_the_hash_of_every_chunk_in_order_under_back_pressure():
    chunks = [os.urandom(n) for n in (1, 4096, 87_000, 3, 65_536) * 20]  # 100 chunks > MAX_QUEUED
    seen: list[tuple[int, int]] = []
    hasher = BackgroundHash(after=lambda offset, length: seen.append((offset, length)))
    for chunk in chunks:
        hasher.update(chunk)
    assert hasher.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()
    # every byte written out once, in order, in batches of what was waiting (at most MAX_QUEUED chunks)
    assert [offset for offset, _ in seen] == [sum(length for _, length in seen[:i]) for i in range(len(seen))]
    assert sum(length for _, length in seen) == sum(map(len, chunks))
    assert len(seen) >= len(chunks) / spool.MAX_QUEUED


def test_a_failing_helper_is_reported_not_hung():
    hasher = BackgroundHash(after=lambda offset, length: 1 / 0)
    hasher.update(b"x" * 10)
    with pytest.raises(RuntimeError, match="hashing"):
        hasher.hexdigest()


def test_a_deferred_head_is_anchored_only_once_flushed(tmp_path):
    """After a power loss the anchor may lag the database, never lead it (a false tamper alarm)."""
    from segnode.db.fast import FastDB
    from segnode.db.session import make_engine, migrate
    from segnode.audit import events as audit

    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    trail, db = AuditTrail(anchor=tmp_path / "head"), FastDB(engine)

    def append(durable: bool) -> int:
        with trail.lock:
            with db.transaction(deferred=not durable) as tx:
                seq = trail.append(tx, audit.Event(type=audit.APPLICATION_ACTIVITY, action=audit.Action.EXECUTE,
                                                   actor={"test": "x"}))
            trail.committed(durable=durable)
        return seq

    first = append(durable=True)
    assert HeadAnchor.read(tmp_path / "head")[0] == first
    second = append(durable=False)
    assert HeadAnchor.read(tmp_path / "head")[0] == first  # not known on disk yet
    head = trail.take_deferred()
    trail.anchor(head)
    assert HeadAnchor.read(tmp_path / "head")[0] == second
    trail.close()
    engine.dispose()


def test_a_new_instance_answers_before_its_row_is_flushed_and_the_row_follows(node, ct_files, monkeypatch):
    """The new instance's commit is flushed by the WAL-sync thread, grouped; duplicates (which no file could
    rebuild) are flushed on the association's own thread before the answer."""
    flushes: list[str] = []
    real_flush = type(node.store.wal_sync).flush

    def counting_flush(self):
        flushes.append(threading.current_thread().name)
        real_flush(self)

    monkeypatch.setattr(type(node.store.wal_sync), "flush", counting_flush)
    assert storescu(node.dimse.port, ct_files).returncode == 0
    eventually(lambda: "wal-sync" in flushes)
    assert not any(name.startswith("assoc-") for name in flushes)  # six new instances: none waited for it
    eventually(lambda: HeadAnchor.read(node.settings.data.audit_head)[0] == audit_events(node)[-1].seq)
    flushes.clear()
    assert storescu(node.dimse.port, ct_files[:1]).returncode == 0  # a duplicate
    assert any(name.startswith("assoc-") for name in flushes)


def test_without_extended_attributes_every_commit_is_flushed_at_once(start_node, ct_files, monkeypatch):
    def no_xattrs(*args, **kwargs):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(spool.os, "setxattr", no_xattrs)
    node = start_node()
    monkeypatch.setattr(type(node.store.wal_sync), "soon", lambda self: pytest.fail("a commit was deferred"))
    assert storescu(node.dimse.port, ct_files[:2]).returncode == 0
    assert HeadAnchor.read(node.settings.data.audit_head)[0] == audit_events(node)[-1].seq


def test_a_row_lost_to_a_power_loss_is_rebuilt_under_its_sender(tmp_path, ct_files):
    """As a power loss after the answer and before the WAL flush leaves it: the fsynced file in the spool, the
    database and the anchor as they were before. Start-up recovery indexes the file under the calling AE and
    address it recorded (the rules route by them), audits it as such, and the chain verifies."""
    settings = make_settings(tmp_path / "data")
    node = Node(settings)
    node.start(http=False)
    node.stop()
    before = tmp_path / "before"
    before.mkdir()
    for path in [settings.data.database, settings.data.audit_head]:
        shutil.copy(path, before / path.name)

    node = Node(settings)
    node.start(http=False)
    try:
        assert storescu(node.dimse.port, ct_files[:1], aet="CT1").returncode == 0
        stored = instances(node)[0]
    finally:
        node.stop()
    placed = settings.data_dir / stored.path
    assert os.getxattr(placed, SENDER_XATTR)  # the file says who sent it
    for name in ("segnode.db-wal", "segnode.db-shm"):
        (settings.data.database.parent / name).unlink(missing_ok=True)
    for path in [settings.data.database, settings.data.audit_head]:
        shutil.copy(before / path.name, path)  # what the disk held: the row and its event never got there

    node = Node(settings)
    node.start(http=False)
    try:
        rows = instances(node)
        assert [(r.sop_instance_uid, r.sha256) for r in rows] == [(stored.sop_instance_uid, stored.sha256)]
        assert rows[0].source.startswith("dimse:CT1@127.0.0.1:") and rows[0].source == stored.source
        event = next(e for e in audit_events(node) if stored.sop_instance_uid in e.objects and e.outcome == 0)
        assert '"ae_title":"CT1"' in event.actor and "start-up recovery" in event.detail
        with node.engine.connect() as conn:
            assert verify_connection(conn, settings.data.audit_head).ok
            assert conn.execute(select(Instance.source)).scalar_one() == stored.source
    finally:
        node.stop()


@pytest.mark.parametrize("pdu", ["8192", "131072"])
def test_every_stored_file_has_the_hash_its_row_records(node, ct_files, pdu):
    """Datasets are hashed on a helper thread from the PDU buffers they arrived in, and those buffers are
    reused: the hash in the index must still be the stored file's, however the sender cuts its PDUs."""
    assert storescu(node.dimse.port, ct_files, "--max-send-pdu", pdu).returncode == 0
    rows = instances(node)
    assert len(rows) == len(ct_files)
    for row in rows:
        assert hashlib.sha256((node.settings.data_dir / row.path).read_bytes()).hexdigest() == row.sha256


def test_a_failed_hash_is_refused_with_a700_and_leaves_nothing(node, ct_files, monkeypatch):
    def broken(self):
        raise RuntimeError("hashing the received bytes failed")

    monkeypatch.setattr(BackgroundHash, "hexdigest", broken)
    result = storescu(node.dimse.port, ct_files[:1], "-v")
    assert "Refused: OutOfResources" in result.stdout + result.stderr
    assert instances(node) == [] and list((node.settings.data_dir / "tmp").iterdir()) == []
    monkeypatch.undo()
    assert storescu(node.dimse.port, ct_files[:1]).returncode == 0 and len(instances(node)) == 1
