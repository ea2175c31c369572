"""The audit trail detects every edit, deletion and insertion, and names the event."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from tests.conftest import storescu


def verify(data_dir) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "segnode", "audit", "verify", "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def trail(start_node, ct_files):
    """A stopped node's data directory with a real trail: start, 6 stores, stop."""
    node = start_node()
    assert storescu(node.dimse.port, ct_files).returncode == 0
    node.stop()
    return node.settings.data_dir


def _db(data_dir) -> sqlite3.Connection:
    return sqlite3.connect(data_dir / "segnode.db")


def test_intact_trail_verifies(trail):
    result = verify(trail)
    assert result.returncode == 0, result.stdout
    assert "intact: 8 events" in result.stdout  # started, 6 instances, stopped
    assert "no head anchor" not in result.stdout


@pytest.mark.parametrize("tamper,named", [
    ("UPDATE audit_events SET detail = 'nothing happened' WHERE seq = 4", "event 4 was edited"),
    ("DELETE FROM audit_events WHERE seq = 3", "events 3..3 are missing"),
    ("DELETE FROM audit_events WHERE seq >= 7", "events 7..8 are missing (deleted from the end of the trail)"),
])
def test_tampering_is_named(trail, tamper, named):
    with _db(trail) as db:
        db.execute(tamper)
    result = verify(trail)
    assert result.returncode == 1
    assert named in result.stdout


def test_inserted_event_is_named(trail):
    with _db(trail) as db:
        row = db.execute("SELECT * FROM audit_events WHERE seq = 5").fetchone()
        db.execute("UPDATE audit_events SET seq = seq + 1000 WHERE seq > 4")
        db.execute("UPDATE audit_events SET seq = seq - 999 WHERE seq > 1000")
        forged = list(row)
        forged[0] = 5
        forged[-3] = "forged detail"
        db.execute(f"INSERT INTO audit_events VALUES ({','.join('?' * len(forged))})", forged)
    result = verify(trail)
    assert result.returncode == 1
    assert "event 5 was edited" in result.stdout
    assert "event 6 does not follow" in result.stdout
    assert "event 7" not in result.stdout  # the report points at the break, not at every later event


def test_rehashed_forgery_still_breaks_the_chain(trail):
    """Editing an event and recomputing its own hash is caught by the next event's link."""
    import hashlib
    import json

    with _db(trail) as db:
        db.row_factory = sqlite3.Row
        row = dict(db.execute("SELECT * FROM audit_events WHERE seq = 4").fetchone())
        row["detail"] = "forged"
        body = {k: row[k] for k in ("time", "event_id", "event_name", "action", "outcome", "status",
                                    "actor", "objects", "detail", "prev_hash")}
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        db.execute("UPDATE audit_events SET detail = ?, hash = ? WHERE seq = 4", ("forged", digest))
    result = verify(trail)
    assert result.returncode == 1 and "event 5 does not follow" in result.stdout

