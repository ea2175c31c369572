"""STOW-RS: success, partial failure, every error code, streaming across chunk boundaries."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator

import httpx
import pytest
from pydicom.dataset import Dataset

from segnode.dicom import status as st
from segnode.dicom.part10 import parse_meta
from testdata import ct_series, poison_bytes
from tests.conftest import audit_events, dataset_bytes, instances


def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def multipart(parts: list[tuple[str, bytes]], boundary: str) -> bytes:
    out = b""
    for ctype, body in parts:
        out += f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + body + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def stow(node, parts: list[tuple[str, bytes]], study: str | None = None, headers: dict[str, str] | None = None,
         chunk: int | None = None, content_type: str | None = None) -> httpx.Response:
    boundary = uuid.uuid4().hex
    body = multipart(parts, boundary)
    url = f"http://127.0.0.1:{node.http_port}/dicom-web/studies" + (f"/{study}" if study else "")
    ctype = content_type or f'multipart/related; type="application/dicom"; boundary={boundary}'
    content: bytes | Iterator[bytes] = body
    if chunk:
        content = iter([body[i : i + chunk] for i in range(0, len(body), chunk)])
    return httpx.post(url, content=content, headers={"Content-Type": ctype, **(headers or {})}, timeout=30)


def _series(n: int = 3, seed: int = 21) -> list[Dataset]:
    return list(ct_series(n_slices=n, rows=16, cols=16, seed=seed))


def test_stow_stores_every_part_and_answers_200(node):
    series = _series()
    rsp = stow(node, [("application/dicom", part10(ds)) for ds in series])
    assert rsp.status_code == 200
    assert rsp.headers["content-type"].startswith("application/dicom+json")
    refs = rsp.json()["00081199"]["Value"]
    assert {r["00081155"]["Value"][0] for r in refs} == {ds.SOPInstanceUID for ds in series}
    assert "00081198" not in rsp.json()
    rows = {r.sop_instance_uid: r for r in instances(node)}
    for ds in series:  # dataset bytes exactly as sent
        sent = part10(ds)
        meta = parse_meta(sent)
        assert meta is not None
        assert dataset_bytes(node.settings.data_dir / rows[ds.SOPInstanceUID].path) == sent[meta.dataset_offset:]
    studies = httpx.get(f"http://127.0.0.1:{node.http_port}/api/studies").json()
    assert studies == [{"study_uid": series[0].StudyInstanceUID, "series": [
        {"series_uid": series[0].SeriesInstanceUID, "modality": "CT", "instances": 3}]}]


def test_stow_and_c_store_of_the_same_instance_give_the_same_file(node, ct_files):
    from tests.conftest import storescu

    assert storescu(node.dimse.port, ct_files[:1]).returncode == 0
    before = instances(node)[0]
    rsp = stow(node, [("application/dicom", ct_files[0].read_bytes())])
    assert rsp.status_code == 200
    after = instances(node)
    assert len(after) == 1 and after[0].sha256 == before.sha256 and after[0].version == 1
    assert dataset_bytes(node.settings.data_dir / after[0].path) == dataset_bytes(ct_files[0])


def test_stow_streams_parts_split_across_small_chunks(node):
    series = _series(4, seed=5)
    rsp = stow(node, [("application/dicom", part10(ds)) for ds in series], chunk=97)
    assert rsp.status_code == 200
    assert len(instances(node)) == 4


def test_partial_failure_answers_202_with_failed_sop_sequence(node):
    good = _series(2)
    rsp = stow(node, [("application/dicom", part10(good[0])), ("text/plain", b"hello, not DICOM"),
                      ("application/dicom", part10(good[1])), ("application/dicom", b"\x00" * 200)])
    assert rsp.status_code == 202
    body = rsp.json()
    assert len(body["00081199"]["Value"]) == 2
    reasons = [item["00081197"]["Value"][0] for item in body["00081198"]["Value"]]
    assert reasons == [st.CANNOT_UNDERSTAND, st.CANNOT_UNDERSTAND]
    assert len(instances(node)) == 2
    events = audit_events(node)  # the first refusal of a status in full, the others counted in one event
    assert sum(1 for e in events if e.status == st.CANNOT_UNDERSTAND) == 1
    assert sum("1 more instances refused in this STOW-RS request (0xC210 x1)" in e.detail for e in events) == 1


@pytest.mark.parametrize("chunk", [None, 7])
def test_a_preamble_and_an_epilogue_are_ignored_as_rfc_2046_says(node, chunk):
    """Some clients (mail-style MIME libraries) write text before the first boundary and after the last."""
    series = _series(2, seed=31)
    boundary = uuid.uuid4().hex
    body = (b"This is a multi-part message in MIME format.\r\n" + multipart(
        [("application/dicom", part10(ds)) for ds in series], boundary) + b"epilogue: ignored\r\n")
    url = f"http://127.0.0.1:{node.http_port}/dicom-web/studies"
    content = body if chunk is None else iter([body[i:i + chunk] for i in range(0, len(body), chunk)])
    rsp = httpx.post(url, content=content, timeout=30,
                     headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert rsp.status_code == 200, rsp.text
    assert {r.sop_instance_uid for r in instances(node)} == {ds.SOPInstanceUID for ds in series}
    endless = httpx.post(url, content=b"x" * 100_000, timeout=30,  # no boundary at all: a bounded read, then 400
                         headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert endless.status_code == 400 and "no boundary" in endless.text


@pytest.mark.parametrize("chunk", [None, 3])
def test_transport_padding_after_a_boundary_is_ignored_as_rfc_2046_says(node, chunk):
    """Spaces or tabs between a delimiter and its CRLF (RFC 2046 5.1.1 transport-padding) were refused as a
    malformed body (python-multipart: "Did not find CR at end of boundary")."""
    series = _series(2, seed=34)
    boundary = uuid.uuid4().hex
    body = multipart([("application/dicom", part10(ds)) for ds in series], boundary)
    body = body.replace(f"--{boundary}\r\n".encode(), f"--{boundary} \t \r\n".encode())
    body = body.replace(f"--{boundary}--\r\n".encode(), f"--{boundary}--  \r\n".encode())
    url = f"http://127.0.0.1:{node.http_port}/dicom-web/studies"
    content = body if chunk is None else iter([body[i:i + chunk] for i in range(0, len(body), chunk)])
    rsp = httpx.post(url, content=content, timeout=60,
                     headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert rsp.status_code == 200, rsp.text
    stored = {r.sop_instance_uid: r.sha256 for r in instances(node)}
    assert set(stored) == {ds.SOPInstanceUID for ds in series}
    plain = stow(node, [("application/dicom", part10(ds)) for ds in series])  # the same bytes without padding
    assert plain.status_code == 200 and {r.sop_instance_uid: r.sha256 for r in instances(node)} == stored


def test_a_failed_part_is_listed_with_the_uids_its_meta_names(node):
    """A part whose file meta lacks a transfer syntax cannot be read, but the sender must be told which
    instance failed (it was listed with empty UIDs)."""
    good, bad = _series(2, seed=33)
    raw = part10(bad)
    meta = parse_meta(raw)
    assert meta is not None
    without_syntax = _meta_without_transfer_syntax(raw, meta.dataset_offset)
    rsp = stow(node, [("application/dicom", part10(good)), ("application/dicom", without_syntax)])
    assert rsp.status_code == 202
    (failed,) = rsp.json()["00081198"]["Value"]
    assert failed["00081155"]["Value"] == [bad.SOPInstanceUID] and failed["00081150"]["Value"] == [bad.SOPClassUID]
    assert failed["00081197"]["Value"] == [st.TRANSFER_SYNTAX_NOT_SUPPORTED]  # as an empty one is


def _meta_without_transfer_syntax(raw: bytes, dataset_offset: int) -> bytes:
    """The same file with (0002,0010) taken out of its meta group (group length fixed)."""
    import struct

    pos, elements = 144, []  # after preamble, DICM and the group length element (12 bytes)
    while pos < dataset_offset:
        elem, vr = struct.unpack_from("<H", raw, pos + 2)[0], raw[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ", b"UC", b"UR"):
            end = pos + 12 + struct.unpack_from("<I", raw, pos + 8)[0]
        else:
            end = pos + 8 + struct.unpack_from("<H", raw, pos + 6)[0]
        if elem != 0x0010:
            elements.append(raw[pos:end])
        pos = end
    body = b"".join(elements)
    return raw[:132] + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body + raw[dataset_offset:]


def test_study_mismatch_answers_409(node):
    series = _series(2)
    rsp = stow(node, [("application/dicom", part10(ds)) for ds in series], study="1.2.3.4.5")
    assert rsp.status_code == 409
    failed = rsp.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [st.DATASET_MISMATCH] * 2
    assert {f["00081155"]["Value"][0] for f in failed} == {ds.SOPInstanceUID for ds in series}
    assert instances(node) == []


def test_study_in_url_matching_is_stored(node):
    series = _series(2)
    rsp = stow(node, [("application/dicom", part10(ds)) for ds in series], study=series[0].StudyInstanceUID)
    assert rsp.status_code == 200 and len(instances(node)) == 2


def test_truncated_part_is_refused(node):
    raw = part10(_series(1)[0])
    rsp = stow(node, [("application/dicom", raw[:-50])])
    assert rsp.status_code == 409
    assert rsp.json()["00081198"]["Value"][0]["00081197"]["Value"] == [st.CANNOT_UNDERSTAND]
    assert list((node.settings.data_dir / "tmp").iterdir()) == []


@pytest.mark.parametrize("content_type", ["application/dicom", "application/json",
                                          'multipart/related; type="application/dicom+json"; boundary=x'])
def test_unsupported_media_type_answers_415(node, content_type):
    rsp = stow(node, [("application/dicom", part10(_series(1)[0]))], content_type=content_type)
    assert rsp.status_code == 415


def test_bad_requests_answer_400(node):
    url = f"http://127.0.0.1:{node.http_port}/dicom-web/studies"
    no_boundary = httpx.post(url, content=b"x", headers={"Content-Type": 'multipart/related; type="application/dicom"'})
    assert no_boundary.status_code == 400
    no_parts = httpx.post(url, content=b"--b--\r\n", headers={"Content-Type": "multipart/related; boundary=b"})
    assert no_parts.status_code == 400
    cut = httpx.post(url, content=b"--b\r\nContent-Type: application/dicom\r\n\r\nabc",
                     headers={"Content-Type": "multipart/related; boundary=b"})
    assert cut.status_code == 400
    assert list((node.settings.data_dir / "tmp").iterdir()) == []
    bad_study = stow(node, [("application/dicom", part10(_series(1)[0]))], study="1.2.x")
    assert bad_study.status_code == 400


def test_bearer_token(start_node):
    node = start_node(http={"token": "s3cret"})
    parts = [("application/dicom", part10(_series(1)[0]))]
    assert stow(node, parts).status_code == 401
    wrong = stow(node, parts, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"http://127.0.0.1:{node.http_port}/api/studies").status_code == 401
    assert stow(node, parts, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    alerts = [e for e in audit_events(node) if e.event_id == "110113"]  # a host's repeats: once a minute
    assert len(alerts) == 1 and "missing or wrong bearer token" in alerts[0].detail


def test_disk_below_floor_answers_503(node):
    node.store.floor_mb = 10**9
    rsp = stow(node, [("application/dicom", part10(_series(1)[0]))])
    assert rsp.status_code == 503 and rsp.headers["retry-after"]
    assert rsp.json()["00081198"]["Value"][0]["00081197"]["Value"] == [st.OUT_OF_RESOURCES]


@pytest.mark.parametrize("syntax", ["1.2.3.4.5", "../../x", ""])
def test_a_part_in_a_transfer_syntax_dimse_would_not_accept_is_refused(node, syntax):
    """Its pixels could never be read: refused with 0xC122, as DIMSE refuses it at negotiation."""
    ds = _series(1)[0]
    raw = part10(ds)
    named = b"1.2.840.10008.1.2.1\x00"  # Explicit VR Little Endian, padded to even length
    assert named in raw[:400]
    raw = raw.replace(named, syntax.encode().ljust(len(named), b"\x00"), 1)
    rsp = stow(node, [("application/dicom", raw)])
    assert rsp.status_code == 409
    failed = rsp.json()["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [st.TRANSFER_SYNTAX_NOT_SUPPORTED]
    assert failed["00081155"]["Value"] == [ds.SOPInstanceUID]  # the sender can tell which part it was
    assert instances(node) == [] and list((node.settings.data_dir / "tmp").iterdir()) == []
    assert any(e.status == st.TRANSFER_SYNTAX_NOT_SUPPORTED for e in audit_events(node))


def test_a_part_pydicom_cannot_decode_is_refused(node):
    ds = _series(1)[0]
    meta = parse_meta(part10(ds))
    assert meta is not None
    raw = part10(ds)[:meta.dataset_offset] + poison_bytes(ds, "short-us")
    rsp = stow(node, [("application/dicom", raw)])
    assert rsp.status_code == 409
    assert rsp.json()["00081198"]["Value"][0]["00081197"]["Value"] == [st.CANNOT_UNDERSTAND]
    assert instances(node) == []


def test_an_upload_abandoned_mid_part_leaves_no_temp_file_or_descriptor(node, caplog):
    """The client goes away inside a part: its temp file and descriptor were kept until restart, and the
    node logged a traceback ("Exception in ASGI application"); now it is audited like a peer's abort."""
    import os
    import socket
    import time

    raw = part10(_series(1, seed=41)[0])
    boundary = "abandoned"
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + raw[: len(raw) // 2]
    tmp = node.settings.data_dir / "tmp"
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", node.http_port))
        sock.sendall(f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Length: {len(raw) * 2}\r\n"
                     f"Content-Type: multipart/related; type=\"application/dicom\"; boundary={boundary}\r\n\r\n"
                     .encode() + head)
        deadline = time.monotonic() + 5
        while not list(tmp.iterdir()) and time.monotonic() < deadline:  # the part is being spooled
            time.sleep(0.02)
        assert list(tmp.iterdir())
        sock.close()
        deadline = time.monotonic() + 5
        while list(tmp.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list(tmp.iterdir()) == []
    assert len(os.listdir("/proc/self/fd")) <= before + 2  # the node runs in this process: nothing kept open
    assert instances(node) == []
    assert "Exception in ASGI application" not in caplog.text
    assert any("client closed the connection before its request body ended" in e.detail for e in audit_events(node))
