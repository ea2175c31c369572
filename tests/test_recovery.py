"""Start-up recovery: what a crash can leave behind is resolved before the listeners open."""

from __future__ import annotations

import os
import shutil

import pytest

from segnode.service import Node
from tests.conftest import audit_events, instances, make_settings


def test_restart_indexes_placed_files_and_drops_partial_ones(tmp_path, ct_files):
    settings = make_settings(tmp_path / "data")
    node = Node(settings)
    node.start(http=False)
    node.stop()
    # As a crash would leave them: a file renamed into the spool but not indexed (it may have been
    # acknowledged), a half-written temp file (never acknowledged), and a broken file in the spool.
    from pydicom import dcmread

    ds = dcmread(ct_files[0])
    placed = settings.data_dir / "spool" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    placed.parent.mkdir(parents=True)
    shutil.copy(ct_files[0], placed)
    (settings.data_dir / "tmp" / "abc.part").write_bytes(ct_files[1].read_bytes()[:1000])
    broken = settings.data_dir / "spool" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(ct_files[2].read_bytes()[:3000])
    no_meta = settings.data_dir / "spool" / "1.2.3" / "1.2.3.4" / "1.2.3.4.6.dcm"
    no_meta.write_bytes(b"not a DICOM file at all" * 20)

    node = Node(settings)
    node.start(http=False)
    try:
        rows = instances(node)
        assert [r.sop_instance_uid for r in rows] == [ds.SOPInstanceUID]
        assert (settings.data_dir / rows[0].path).read_bytes() == ct_files[0].read_bytes()
        assert list((settings.data_dir / "tmp").iterdir()) == []
        assert not broken.exists()
        assert not no_meta.exists()  # kept aside, never deleted
        kept = settings.data_dir / "superseded" / "unreadable.1.2.3.4.6.dcm"
        assert kept.read_bytes() == b"not a DICOM file at all" * 20
        events = audit_events(node)
        assert any('"protocol":"recovery"' in e.actor and e.outcome == 0 for e in events)
        assert any('"protocol":"recovery"' in e.actor and e.status == 0xC210 for e in events)
    finally:
        node.stop()


def test_a_second_node_on_a_data_dir_in_use_stops_before_touching_it(tmp_path):
    """Start-up recovery removes temp files it takes for a crash's leftovers: a second node on a running
    node's data directory would delete that node's uploads in flight. It must stop first, saying who holds it."""
    import os
    import subprocess
    import sys

    import pytest

    from segnode.lock import DataDirInUse
    from tests.conftest import echo_ok

    settings = make_settings(tmp_path / "data")
    first = Node(settings)
    first.start(http=False)
    try:
        in_flight = settings.data_dir / "tmp" / "upload.part"
        in_flight.write_bytes(b"half an instance")
        settings.data.metrics.mkdir(parents=True, exist_ok=True)
        counted = settings.data.metrics / "counter_1.db"  # the running node's metrics (serve's multiprocess files)
        counted.write_bytes(b"counts")
        with pytest.raises(DataDirInUse, match=f"in use by another segnode \\(pid {os.getpid()} on "):
            Node(settings)
        cli = subprocess.run([sys.executable, "-m", "segnode", "serve", "--data-dir", str(settings.data_dir),
                              "--dimse-port", "0", "--http-port", "0"], capture_output=True, text=True, timeout=120)
        assert cli.returncode == 2 and "Traceback" not in cli.stderr
        assert f"data directory {settings.data_dir} is in use by another segnode (pid {os.getpid()}" in cli.stderr
        assert in_flight.read_bytes() == b"half an instance" and echo_ok(first)
        assert counted.read_bytes() == b"counts"  # refused before it emptied the metrics folder
    finally:
        first.stop()
    second = Node(settings)  # the lock went with the first node
    second.start(http=False)
    second.stop()


def test_a_crash_while_the_audit_key_is_made_never_leaves_an_empty_key_in_use(tmp_path):
    """The key was created in place, then written: a crash between the two left an empty file that later
    starts read as the key (every patient hash keyed with nothing)."""
    import pytest

    from segnode.datadir import DataDir
    from segnode.errors import ConfigurationError
    from segnode.service import KEY_BYTES, load_secret

    data = DataDir(tmp_path / "data")
    data.root.mkdir()
    key = load_secret(data)
    assert len(key) == KEY_BYTES and load_secret(data) == key  # made once, then read
    assert [p.name for p in data.root.iterdir()] == ["audit.key"]  # no temp file left
    data.audit_key.write_bytes(b"")  # what the old crash window left behind
    with pytest.raises(ConfigurationError, match="holds 0 bytes, not a 32-byte key; restore it"):
        load_secret(data)


@pytest.mark.parametrize("cut", ["after the new bytes were placed", "before they were placed"])
def test_an_overwrite_cut_short_by_a_crash_leaves_the_acknowledged_version_indexed(tmp_path, ct_files, cut):
    """An overwrite moves the indexed version to superseded/ and renames the new bytes into its place before
    it commits: a kill -9 between left the row naming version 1 while its path held bytes never acknowledged,
    and version 1 orphaned in superseded/. Recovery puts version 1 back."""
    import hashlib

    from tests.conftest import storescu

    settings = make_settings(tmp_path / "data")
    node = Node(settings)
    node.start(http=False)
    try:
        assert storescu(node.dimse.port, ct_files[:1]).returncode == 0
        (row,) = instances(node)
    finally:
        node.stop()
    placed = settings.data_dir / row.path
    acknowledged = placed.read_bytes()
    os.replace(placed, settings.data_dir / "superseded" / f"{row.sop_instance_uid}.v1.{row.sha256[:16]}.dcm")
    if cut.startswith("after"):
        placed.write_bytes(acknowledged[:-2] + b"\x01\x02")  # the never acknowledged version 2

    node = Node(settings)
    node.start(http=False)
    try:
        (after,) = instances(node)
        assert (after.version, after.sha256) == (1, row.sha256)
        assert hashlib.sha256(placed.read_bytes()).hexdigest() == row.sha256
        assert list((settings.data_dir / "superseded").iterdir()) == []
        assert any("overwrite was cut short by a crash" in e.detail for e in audit_events(node))
    finally:
        node.stop()
