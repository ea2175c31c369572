"""Failures inside the node: storage errors, timeouts, the association limit."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from pydicom.uid import CTImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from segnode.dicom import status as st
from segnode.ingest.spool import Spool
from tests.conftest import associate_rq, audit_events, echo_ok, echoscu, eventually, instances, storescu


@pytest.mark.parametrize("what", ["rename", "directory fsync"])
def test_storage_failure_answers_a700_and_leaves_no_orphan(node, ct_files, monkeypatch, what):
    import os

    def broken_place(self, tmp_path, relative):
        if what == "rename":
            raise OSError(28, "No space left on device")
        final = self.root / relative
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_path, final)  # renamed; its directory's flush fails
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Spool, "place", broken_place)
    result = storescu(node.dimse.port, ct_files[:2], "-v", "--no-halt")
    assert "Received Store Response (Refused: OutOfResources)" in result.stdout + result.stderr
    assert instances(node) == []
    data = node.settings.data_dir
    assert [p for p in data.rglob("*") if p.is_file() and p.parent.name not in ("", data.name)
            and p.suffix in (".dcm", ".part")] == []
    assert sum(1 for e in audit_events(node) if e.status == st.OUT_OF_RESOURCES) == 2
    monkeypatch.undo()
    assert storescu(node.dimse.port, ct_files[:2]).returncode == 0 and len(instances(node)) == 2


def test_database_failure_answers_a700_and_removes_the_placed_file(node, ct_files, monkeypatch):
    from segnode.db import fast

    real_insert = fast.Tx.insert

    def failing_insert(self, table, values):
        if table.name == "instances":
            raise RuntimeError("database unavailable")
        return real_insert(self, table, values)

    monkeypatch.setattr(fast.Tx, "insert", failing_insert)
    result = storescu(node.dimse.port, ct_files[:1], "-v")
    assert "Refused: OutOfResources" in result.stdout + result.stderr
    assert not list((node.settings.data_dir / "spool").rglob("*.dcm"))
    assert list((node.settings.data_dir / "tmp").iterdir()) == []


def test_studies_cli_prints_what_the_api_returns(node, ct_files):
    assert storescu(node.dimse.port, ct_files).returncode == 0
    api = httpx.get(f"http://127.0.0.1:{node.http_port}/api/studies", timeout=10).json()
    cli = subprocess.run([sys.executable, "-m", "segnode", "studies", "--data-dir", str(node.settings.data_dir)],
                         capture_output=True, text=True, timeout=60)
    import json

    assert cli.returncode == 0 and json.loads(cli.stdout) == api
    assert api[0]["series"][0]["instances"] == len(ct_files)


def test_silent_connection_is_closed_after_the_acse_timeout(start_node):
    node = start_node(dimse={"acse_timeout": 0.5})
    sock = socket.create_connection(("127.0.0.1", node.dimse.port), timeout=10)
    start = time.monotonic()
    data = sock.recv(100)  # nothing sent: the node gives up on us
    assert time.monotonic() - start < 5
    assert data in (b"",) or data[0] == 0x07  # closed, or an A-ABORT first
    sock.close()
    assert echo_ok(node)


def test_stalled_association_is_aborted_after_the_network_timeout(start_node):
    node = start_node(dimse={"network_timeout": 0.5})
    ae = AE("STALLER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="SEGNODE")
    assert assoc.is_established
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    assert echo_ok(node)


def _trickle(port: int, data: bytes, every: float, stop_after: float) -> tuple[float, bytes]:
    """Send `data` a byte every `every` s until the node closes on us (or `stop_after` s); returns how long
    the node let us go on and what it answered."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    start = time.monotonic()
    try:
        for byte in data:
            sock.sendall(bytes([byte]))
            time.sleep(every)
            if time.monotonic() - start > stop_after:
                break
        sock.settimeout(5)
        answer = sock.recv(100)
    except OSError:
        answer = b""
    finally:
        sock.close()
    return time.monotonic() - start, answer


def test_an_association_request_trickled_a_byte_at_a_time_is_dropped_at_the_deadline(start_node):
    """Each byte arrives well within the timeout, but the request as a whole must be in within acse_timeout
    of the accept (ARTIM); and peers still sending their request hold no association slot, so a modality
    that has identified itself is served meanwhile (it was refused "local limit exceeded")."""
    node = start_node(dimse={"acse_timeout": 1.0, "max_associations": 2})
    results: list[tuple[float, bytes]] = []
    threads = [threading.Thread(target=lambda: results.append(_trickle(node.dimse.port, associate_rq(Verification, calling="TRICKLE"), 0.2, 8)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    assert echo_ok(node) and echo_ok(node)  # while three slow peers are connected, with two slots
    for thread in threads:
        thread.join()
    assert len(results) == 3
    for took, answer in results:
        assert took < 4, took  # cut off near 1 s, not after the 10 s the whole request would take
        assert answer in (b"",) or answer[0] == 0x07
    assert echo_ok(node)


def test_a_pdu_trickled_a_byte_at_a_time_is_aborted_at_the_deadline(start_node):
    node = start_node(dimse={"network_timeout": 1.0})
    sock = socket.create_connection(("127.0.0.1", node.dimse.port), timeout=10)
    sock.sendall(associate_rq(Verification, calling="TRICKLE"))
    assert sock.recv(6)[0] == 0x02  # A-ASSOCIATE-AC
    sock.recv(65536)
    start = time.monotonic()
    pdata = bytes([0x04, 0, 0, 0, 0, 100]) + bytes(100)  # a P-DATA-TF that never completes in time
    answer = b""
    try:
        for byte in pdata:
            sock.sendall(bytes([byte]))
            time.sleep(0.2)
            if time.monotonic() - start > 8:
                break
        sock.settimeout(5)
        answer = sock.recv(100)
    except OSError:
        pass
    sock.close()
    assert time.monotonic() - start < 4
    assert answer in (b"",) or answer[0] == 0x07
    assert echo_ok(node)


def test_associations_over_the_limit_are_rejected_transiently(start_node):
    node = start_node(dimse={"max_associations": 1})
    ae = AE("HOLDER")
    ae.add_requested_context(CTImageStorage)
    held = ae.associate("127.0.0.1", node.dimse.port, ae_title="SEGNODE")
    assert held.is_established
    second = echoscu(node.dimse.port)
    assert second.returncode != 0 and "Local Limit Exceeded" in second.stdout + second.stderr
    held.release()
    eventually(lambda: echo_ok(node), timeout=5)


def test_failed_overwrite_restores_the_previous_version(node, ct_files, tmp_path, monkeypatch):
    from pydicom import dcmread

    from segnode.db import fast

    assert storescu(node.dimse.port, ct_files[:1]).returncode == 0
    before = instances(node)[0]
    original = (node.settings.data_dir / before.path).read_bytes()
    ds = dcmread(ct_files[0])
    ds.SeriesDescription = "changed"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    monkeypatch.setattr(fast.Tx, "update", lambda self, table, row_id, values: (_ for _ in ()).throw(
        RuntimeError("database unavailable")))
    result = storescu(node.dimse.port, [changed], "-v")
    assert "Refused: OutOfResources" in result.stdout + result.stderr
    after = instances(node)[0]
    assert after.sha256 == before.sha256 and after.version == 1
    assert (node.settings.data_dir / after.path).read_bytes() == original
    assert list((node.settings.data_dir / "superseded").iterdir()) == []


def _full_disk(monkeypatch, where: str) -> None:
    """ENOSPC where the spool writes: creating the temp file, writing it, or flushing it."""
    from segnode.ingest.spool import SpoolWriter

    def enospc(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if where == "create":
        monkeypatch.setattr(SpoolWriter, "__init__", enospc)
    elif where == "write":
        monkeypatch.setattr(SpoolWriter, "write", enospc)
    else:
        monkeypatch.setattr(SpoolWriter, "_flush", staticmethod(enospc))


@pytest.mark.parametrize("where", ["create", "write", "fsync"])
def test_a_full_disk_answers_like_the_floor_does(node, ct_files, monkeypatch, where):
    """ENOSPC with the floor at 0: each instance is refused with 0xA700 (STOW-RS: 503, Retry-After, 0xA700
    per part) and audited, nothing is left half-written, and the node serves again once there is room
    (the association was reset without a status, STOW answered 400 "malformed multipart body")."""
    from tests.test_stow import part10, stow

    _full_disk(monkeypatch, where)
    result = storescu(node.dimse.port, ct_files[:2], "-v", "--no-halt")
    assert (result.stdout + result.stderr).count("Refused: OutOfResources") == 2, result.stdout + result.stderr
    from pydicom import dcmread

    rsp = stow(node, [("application/dicom", part10(dcmread(f))) for f in ct_files[2:4]])
    assert rsp.status_code == 503 and int(rsp.headers["Retry-After"]) > 0
    failed = rsp.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"] for f in failed] == [[st.OUT_OF_RESOURCES]] * 2
    assert all(f["00081155"]["Value"] for f in failed)  # which instance, where the meta was read
    assert instances(node) == [] and list((node.settings.data_dir / "tmp").iterdir()) == []
    events = audit_events(node)  # per association and per request: the first in full, then one count
    assert sum(1 for e in events if e.status == st.OUT_OF_RESOURCES) == 2
    assert sum("1 more instances refused in this" in e.detail and "0xA700 x1" in e.detail for e in events) == 2
    monkeypatch.undo()
    assert storescu(node.dimse.port, ct_files[:2]).returncode == 0 and len(instances(node)) == 2


def test_connections_not_yet_associated_are_bounded(start_node):
    """Each unidentified connection holds a thread and a buffer: 400 of them took 351 threads and 400 MB.
    Beyond max_associations + PENDING_CONNECTIONS the node closes new ones at once, and still serves."""
    from segnode.ingest.scp import PENDING_CONNECTIONS

    node = start_node(dimse={"acse_timeout": 2.0, "max_associations": 2})
    before = threading.active_count()
    socks = [socket.create_connection(("127.0.0.1", node.dimse.port)) for _ in range(80)]
    time.sleep(0.5)
    assert threading.active_count() - before <= 2 + PENDING_CONNECTIONS
    for sock in socks:
        sock.close()
    eventually(lambda: echo_ok(node), timeout=10)


def test_an_association_request_claiming_a_megabyte_holds_only_what_it_sent(start_node):
    """An A-ASSOCIATE-RQ header claiming 1 MiB, then silence: the buffer was allocated from the claim, 1 MiB per
    unidentified connection before a byte of it came. Now it grows with the bytes received."""
    import struct
    import tracemalloc

    from segnode.ingest.ul import MAX_ASSOCIATE_RQ

    node = start_node(dimse={"acse_timeout": 5.0})
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        socks = [socket.create_connection(("127.0.0.1", node.dimse.port)) for _ in range(24)]
        for sock in socks:
            sock.sendall(struct.pack(">BBI", 0x01, 0, MAX_ASSOCIATE_RQ) + b"\x00" * 100)
        time.sleep(0.5)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 24 * 200 * 1024, grown  # was 24 MiB
    for sock in socks:
        sock.close()
    eventually(lambda: echo_ok(node), timeout=10)
