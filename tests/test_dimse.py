"""DIMSE ingest against real peers: dcmtk's echoscu/storescu and a pynetdicom SCU."""

from __future__ import annotations

import io
import json
import socket
import struct
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from segnode.dicom import status as st
from testdata import ct_series, poison_bytes
from tests.conftest import RawStore, associate_rq, audit_events, dataset_bytes, echo_ok, echoscu, eventually, instances, storescu

UNCOMPRESSED = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
ENCAPSULATED = [
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
]


def test_c_echo_with_dcmtk(node):
    result = echoscu(node.dimse.port, "-v")
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


def test_storescu_series_is_stored_byte_exact_and_listed(node, ct_files):
    result = storescu(node.dimse.port, ct_files)
    assert result.returncode == 0, result.stderr
    rows = instances(node)
    assert len(rows) == len(ct_files)
    by_uid = {r.sop_instance_uid: r for r in rows}
    from pydicom import dcmread

    for path in ct_files:
        ds = dcmread(path)
        row = by_uid[ds.SOPInstanceUID]
        stored = node.settings.data_dir / row.path
        assert dataset_bytes(stored) == dataset_bytes(path)  # no transcoding, not a byte changed
        assert row.sha256 and row.size == stored.stat().st_size
        assert row.modality == "CT" and row.instance_number == ds.InstanceNumber
    transferred = [e for e in audit_events(node) if e.event_id == "110104"]
    assert len(transferred) == len(ct_files)
    objects = json.loads(transferred[0].objects)
    assert objects["sha256"] in {r.sha256 for r in rows}
    assert "PHANTOM" not in transferred[0].objects + transferred[0].actor  # patient only as a keyed hash
    assert len(objects["patient_key"]) == 32


def _encapsulated(ds: Dataset) -> Dataset:
    ds = ds.copy()
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + bytes(range(256)) * 3 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def test_every_transfer_syntax_round_trips_byte_exact(node):
    ae = AE("TESTSCU")
    for ts in UNCOMPRESSED + ENCAPSULATED:
        ae.add_requested_context(CTImageStorage, [ts])
    assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="SEGNODE")
    assert assoc.is_established
    accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
    assert accepted == set(UNCOMPRESSED + ENCAPSULATED)
    sent = {}
    for i, (ts, ds) in enumerate(zip(UNCOMPRESSED + ENCAPSULATED, ct_series(n_slices=16, rows=16, cols=16, seed=3))):
        if ts in ENCAPSULATED:
            ds = _encapsulated(ds)
        ds.file_meta.TransferSyntaxUID = ts
        status = assoc.send_c_store(ds, msg_id=i + 1)
        assert status.Status == 0, ts
        implicit, little = ts == ImplicitVRLittleEndian, ts != ExplicitVRBigEndian
        sent[ds.SOPInstanceUID] = (ts, encode(ds, implicit, little, ts == DeflatedExplicitVRLittleEndian))
    assoc.release()
    rows = {r.sop_instance_uid: r for r in instances(node)}
    assert len(rows) == len(sent)
    for uid, (ts, raw) in sent.items():
        row = rows[uid]
        assert row.transfer_syntax_uid == ts
        assert dataset_bytes(node.settings.data_dir / row.path) == raw, ts


def _one_ct() -> Dataset:
    return next(ct_series(n_slices=1, rows=16, cols=16, seed=11))


def _refused(node, raw: bytes, sop_class: str = CTImageStorage, sop_instance: str | None = None,
             syntax: str = ExplicitVRLittleEndian, context_class: str = CTImageStorage) -> int:
    scu = RawStore(node.dimse.port, [(CTImageStorage, [syntax]), (MRImageStorage, [syntax])])
    try:
        rsp = scu.send(raw, scu.context_id(context_class, syntax), sop_class, sop_instance or "1.2.3.4")
        assert rsp is not None
        return int(rsp.Status)
    finally:
        scu.close()


def _audited(node, status: int) -> bool:
    return any(e.status == status and e.outcome == 8 for e in audit_events(node))


def test_truncated_dataset_is_refused_with_c210(node):
    ds = _one_ct()
    raw = encode(ds, False, True)
    assert _refused(node, raw[:-100], sop_instance=ds.SOPInstanceUID) == st.CANNOT_UNDERSTAND
    assert instances(node) == [] and list((node.settings.data_dir / "tmp").iterdir()) == []
    assert _audited(node, st.CANNOT_UNDERSTAND) and echo_ok(node)


def test_garbage_bytes_are_refused_with_c210(node):
    assert _refused(node, b"this is not DICOM at all" * 10) == st.CANNOT_UNDERSTAND
    assert echo_ok(node)


def test_missing_sop_instance_uid_is_refused(node):
    ds = _one_ct()
    uid = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    assert _refused(node, encode(ds, False, True), sop_instance=uid) == st.MISSING_IDENTIFIER
    assert instances(node) == [] and _audited(node, st.MISSING_IDENTIFIER) and echo_ok(node)


def test_uid_with_path_characters_never_reaches_the_file_system(node):
    ds = _one_ct()
    ds.SeriesInstanceUID = "../../../../tmp/evil"
    assert _refused(node, encode(ds, False, True), sop_instance=ds.SOPInstanceUID) == st.INVALID_UID
    assert instances(node) == []
    assert not list(Path("/tmp").glob("evil*"))
    assert not [p for p in node.settings.data_dir.rglob("*") if p.is_file() and p.suffix == ".dcm"]
    assert _audited(node, st.INVALID_UID) and echo_ok(node)


def test_sop_class_not_matching_the_context_is_refused_with_0122(node):
    ds = _one_ct()
    status = _refused(node, encode(ds, False, True), sop_class=MRImageStorage, sop_instance=ds.SOPInstanceUID,
                      context_class=CTImageStorage)
    assert status == st.SOP_CLASS_NOT_SUPPORTED
    assert instances(node) == [] and _audited(node, st.SOP_CLASS_NOT_SUPPORTED) and echo_ok(node)


def test_dataset_not_matching_its_command_is_refused_with_a900(node):
    ds = _one_ct()
    assert _refused(node, encode(ds, False, True), sop_instance="1.2.3.999") == st.DATASET_MISMATCH
    assert instances(node) == [] and echo_ok(node)


def _associate_raw(port: int) -> socket.socket:
    """Open an association with a raw socket, using pynetdicom only to encode the request."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(associate_rq(CTImageStorage, [ExplicitVRLittleEndian]))
    assert sock.recv(1)[0] == 0x02  # A-ASSOCIATE-AC
    sock.recv(65536)
    return sock


def test_pdu_larger_than_the_cap_is_aborted(start_node):
    node = start_node(dimse={"max_pdu": 65536})
    sock = _associate_raw(node.dimse.port)
    sock.sendall(struct.pack(">BBI", 0x04, 0, 10 * 1024 * 1024))  # announce a 10 MiB P-DATA-TF
    reply = sock.recv(10)
    assert reply[0] == 0x07 and reply[8:10] == bytes([2, 6])  # A-ABORT, provider, invalid PDU parameter
    assert sock.recv(10) == b""  # then the connection is closed
    sock.close()
    assert any(e.event_id == "110113" and "exceeds" in e.detail for e in audit_events(node))
    assert echo_ok(node)


def test_called_ae_title_mismatch_is_rejected(node):
    result = echoscu(node.dimse.port, aec="SOMEONE_ELSE")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr
    assert echo_ok(node)


def test_twenty_associations_at_once(node, tmp_path):
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: echoscu(node.dimse.port, "--repeat", "5").returncode, range(20)))
    assert results == [0] * 20


@pytest.mark.parametrize("floor,watermark,expect", [(10**9, 10**9, "reject"), (10**9, 0, "refuse")])
def test_low_disk(start_node, ct_files, floor, watermark, expect):
    node = start_node(storage={"free_space_floor_mb": 0, "free_space_watermark_mb": 0})
    node.store.floor_mb, node.store.watermark_mb = floor, watermark
    result = storescu(node.dimse.port, ct_files[:1], "-v")
    output = result.stdout + result.stderr
    if expect == "reject":  # under the watermark: transient association reject, the sender retries later
        assert result.returncode != 0
        assert "Local Limit Exceeded" in output and "Transient" in output, output
    else:  # under the floor inside an association: the store is refused, out of resources
        assert "Received Store Response (Refused: OutOfResources)" in output, output
    assert instances(node) == []
    assert list((node.settings.data_dir / "tmp").iterdir()) == []


@pytest.mark.parametrize("kind, syntax", [("short-us", ExplicitVRLittleEndian), ("short-us", ImplicitVRLittleEndian),
                                          ("unknown-vr", ExplicitVRLittleEndian)])
def test_an_instance_pydicom_cannot_decode_is_refused_at_ingest(node, kind, syntax):
    """Well-formed headers but a value no reader can decode: refused with 0xC210, never acknowledged."""
    ds = _one_ct()
    raw = poison_bytes(ds, kind, implicit=syntax == ImplicitVRLittleEndian)
    assert _refused(node, raw, sop_instance=ds.SOPInstanceUID, syntax=syntax) == st.CANNOT_UNDERSTAND
    assert instances(node) == [] and _audited(node, st.CANNOT_UNDERSTAND)


INVENTORY = "1.2.840.10008.5.1.4.1.1.201.1"  # Inventory Storage (2021): not in pynetdicom's list
PRIVATE = "1.3.6.1.4.1.9590.100.1.2.1"  # a vendor's private storage class
WORKLIST_FIND = "1.2.840.10008.5.1.4.31"  # a service class, not storage


def _stored_as(node, sop_class: str, seed: int) -> tuple[str, int | None]:
    """Associate proposing `sop_class` and C-STORE an instance of it; (instance UID, status or None when the
    presentation context was rejected)."""
    ds = next(iter(ct_series(n_slices=1, rows=8, cols=8, seed=seed)))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ae = AE("SCU")
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification: the association is accepted in any case
    assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="SEGNODE")
    assert assoc.is_established
    try:
        if not any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
            return ds.SOPInstanceUID, None
        return ds.SOPInstanceUID, int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_every_storage_class_of_the_standard_and_private_ones_are_stored(node):
    """Negotiation used pynetdicom's list, which lacks recent classes; private classes were refused."""
    from segnode.dicom.sop_classes import STANDARD_STORAGE

    assert INVENTORY in STANDARD_STORAGE and len(STANDARD_STORAGE) > 180
    for seed, sop_class in enumerate((INVENTORY, PRIVATE), start=40):
        uid, status = _stored_as(node, sop_class, seed)
        assert status == st.SUCCESS, sop_class
        assert uid in {r.sop_instance_uid for r in instances(node)}
    assert _stored_as(node, WORKLIST_FIND, 50)[1] is None  # not storage: its context is rejected


def test_the_operator_narrows_the_sop_classes_stored(start_node):
    node = start_node(storage={"sop_classes": {"private": False, "deny": [CTImageStorage]}})
    assert _stored_as(node, PRIVATE, 60)[1] is None
    assert _stored_as(node, CTImageStorage, 61)[1] is None
    assert _stored_as(node, MRImageStorage, 62)[1] == st.SUCCESS
    from tests.test_stow import part10, stow

    ds = next(iter(ct_series(n_slices=1, rows=8, cols=8, seed=63)))
    rsp = stow(node, [("application/dicom", part10(ds))])  # STOW-RS follows the same policy
    (failed,) = rsp.json()["00081198"]["Value"]
    assert rsp.status_code == 409 and failed["00081197"]["Value"] == [st.SOP_CLASS_NOT_SUPPORTED]
    assert failed["00081155"]["Value"] == [ds.SOPInstanceUID]


def test_a_deflate_bomb_is_refused_with_flat_memory(start_node, monkeypatch):
    """1 MB of deflated bytes can inflate to 1 GiB: the dataset was inflated whole in memory before the
    refusal. Now it inflates on disk a chunk at a time, in the data directory's tmp/ (under the free-space
    floor, not the system's /tmp), and stops past storage.max_inflated_mb."""
    import tempfile
    import tracemalloc
    import zlib

    from pydicom.tag import Tag

    inflated_in = []
    real_tempfile = tempfile.TemporaryFile
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda *a, **k: inflated_in.append(k.get("dir")) or real_tempfile(*a, **k))
    node = start_node(storage={"max_inflated_mb": 8})
    ds = next(iter(ct_series(n_slices=1, rows=8, cols=8, seed=70)))
    del ds.PixelData
    ds.add_new(Tag(0x0029, 0x1010), "OB", bytes(64 * 2**20))  # 64 MB of zeros in a private element
    ds.add_new(Tag(0x0029, 0x0010), "LO", "BOMB")
    raw = encode(ds, False, True)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = deflater.compress(raw) + deflater.flush()
    del raw
    assert len(bomb) < 2**20
    scu = RawStore(node.dimse.port, [(CTImageStorage, [DeflatedExplicitVRLittleEndian])])
    tracemalloc.start()
    try:
        rsp = scu.send(bomb, scu.context_id(CTImageStorage, DeflatedExplicitVRLittleEndian), CTImageStorage,
                       ds.SOPInstanceUID)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        scu.assoc.release()
    assert rsp is not None and rsp.Status == st.CANNOT_UNDERSTAND
    assert peak < 16 * 2**20, peak  # the inflated 64 MB never sat in memory
    assert inflated_in == [node.settings.data.tmp]
    (event,) = [e for e in audit_events(node) if e.status == st.CANNOT_UNDERSTAND]
    assert "inflates to more than 8 MB" in event.detail
    assert instances(node) == []


def test_rejected_contexts_peer_aborts_and_many_refusals_are_audited_once_each(node):
    """Rejected presentation contexts and peer aborts wrote no event; 50 refusals in one association
    wrote 50 - now the first of each status in full and one count for the rest."""
    before = len(audit_events(node))
    ae = AE("NOISY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.5.1.4.31")  # a worklist: not storage, rejected
    assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="SEGNODE")
    assert assoc.is_established
    scu_ds = next(iter(ct_series(n_slices=1, rows=8, cols=8, seed=90)))
    for _ in range(50):  # garbage bytes each time: 0xC210
        req = C_STORE()
        req.MessageID, req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = 1, CTImageStorage, scu_ds.SOPInstanceUID
        req.Priority, req.DataSet = 2, io.BytesIO(b"\x00" * 64)
        context = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage)
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dimse.send_msg(req, context)
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        assert rsp.Status == st.CANNOT_UNDERSTAND
    assoc.abort()
    events = eventually(lambda: [e for e in audit_events(node)[before:]
                                 if "aborted by the peer" in e.detail] and audit_events(node)[before:])
    details = [e.detail for e in events]
    assert sum("presentation contexts rejected: 1.2.840.10008.5.1.4.31 (abstract syntax not supported)" in d
               for d in details) == 1
    assert sum(e.status == st.CANNOT_UNDERSTAND for e in events) == 1
    assert any("49 more instances refused in this association (0xC210 x49)" in d for d in details)
    assert len(events) == 4, details
