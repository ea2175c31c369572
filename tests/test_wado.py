"""WADO-RS: instances as stored (byte for byte), metadata without bulk data, refusals, and the remote client."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import httpx
import pytest

from segnode.remote.wado_client import RetrieveError, parse_multipart, retrieve_instance, retrieve_series
from tests.conftest import instances, storescu

TOKEN = {"Authorization": "Bearer s3cret"}
DICOM_ACCEPT = 'multipart/related; type="application/dicom"'


@pytest.fixture
def stored(start_node, ct_files):
    """A node with a token holding the CT series, and its index rows in instance-number order."""
    node = start_node(http={"token": "s3cret"})
    assert storescu(node.dimse.port, ct_files).returncode == 0
    rows = sorted(instances(node), key=lambda r: r.instance_number)
    assert len(rows) == len(ct_files)
    return node, rows


def _base(node) -> str:
    return f"http://127.0.0.1:{node.http_port}"


def _get(node, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(_base(node) + path, headers={**TOKEN, **(headers or {})}, timeout=30)


def test_series_study_and_instance_retrieve_give_the_stored_bytes(stored):
    node, rows = stored
    study, series = rows[0].study_uid, rows[0].series_uid
    for path in (f"/dicom-web/studies/{study}/series/{series}", f"/dicom-web/studies/{study}"):
        rsp = _get(node, path, {"Accept": DICOM_ACCEPT + "; transfer-syntax=*"})
        assert rsp.status_code == 200, rsp.text
        assert rsp.headers["content-type"].startswith('multipart/related; type="application/dicom"; boundary=')
        assert "x-segnode-sha256" not in rsp.headers
        parts = parse_multipart(rsp.content, rsp.headers["content-type"])
        assert len(parts) == len(rows)
        for (headers, content), row in zip(parts, rows):  # instance-number order, byte for byte
            assert hashlib.sha256(content).hexdigest() == row.sha256
            assert content == node.settings.data.path(row.path).read_bytes()
            assert headers["content-type"] == f"application/dicom;transfer-syntax={row.transfer_syntax_uid}"
            assert headers["content-location"] == (f"{_base(node)}/dicom-web/studies/{study}/series/{series}"
                                                   f"/instances/{row.sop_instance_uid}")

    row = rows[2]
    for accept in (None, "*/*", f"{DICOM_ACCEPT}; transfer-syntax={row.transfer_syntax_uid}",
                   f"image/jpeg, {DICOM_ACCEPT}"):
        rsp = _get(node, f"/dicom-web/studies/{study}/series/{series}/instances/{row.sop_instance_uid}",
                   {"Accept": accept} if accept else None)
        assert rsp.status_code == 200, (accept, rsp.text)
        assert rsp.headers["x-segnode-sha256"] == row.sha256
        [(_, content)] = parse_multipart(rsp.content, rsp.headers["content-type"])
        assert hashlib.sha256(content).hexdigest() == row.sha256


def test_metadata_has_the_attributes_but_no_pixel_data(stored):
    node, rows = stored
    study, series = rows[0].study_uid, rows[0].series_uid
    rsp = _get(node, f"/dicom-web/studies/{study}/series/{series}/metadata")
    assert rsp.status_code == 200, rsp.text
    assert rsp.headers["content-type"].startswith("application/dicom+json")
    objects = rsp.json()
    assert [o["00080018"]["Value"][0] for o in objects] == [r.sop_instance_uid for r in rows]
    assert [o["00200013"]["Value"][0] for o in objects] == [r.instance_number for r in rows]
    assert all("7FE00010" not in o and o["0020000E"]["Value"][0] == series for o in objects)

    row = rows[1]
    rsp = _get(node, f"/dicom-web/studies/{study}/series/{series}/instances/{row.sop_instance_uid}/metadata",
               {"Accept": "application/dicom+json"})
    assert rsp.status_code == 200
    [obj] = rsp.json()
    assert obj["00080018"]["Value"] == [row.sop_instance_uid] and "7FE00010" not in obj
    assert _get(node, f"/dicom-web/studies/{study}/series/{series}/metadata",
                {"Accept": "image/jpeg"}).status_code == 406


def test_refusals(stored):
    node, rows = stored
    study, series, sop = rows[0].study_uid, rows[0].series_uid, rows[0].sop_instance_uid
    instance = f"/dicom-web/studies/{study}/series/{series}/instances/{sop}"
    for path in (f"/dicom-web/studies/{study}", f"/dicom-web/studies/{study}/series/{series}", instance,
                 f"/dicom-web/studies/{study}/series/{series}/metadata", instance + "/metadata"):
        rsp = httpx.get(_base(node) + path, timeout=30)
        assert rsp.status_code == 401, path
        assert httpx.get(_base(node) + path, headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 401
    unknown = "1.2.3.4.5.6.7"
    assert _get(node, f"/dicom-web/studies/{unknown}").status_code == 404
    assert _get(node, f"/dicom-web/studies/{study}/series/{unknown}").status_code == 404
    assert _get(node, f"/dicom-web/studies/{study}/series/{unknown}/metadata").status_code == 404
    assert _get(node, f"/dicom-web/studies/{study}/series/{series}/instances/{unknown}").status_code == 404
    assert _get(node, f"/dicom-web/studies/{unknown}/series/{series}/instances/{sop}").status_code == 404  # not there
    for bad in ("1.02.3", "abc", "1." * 40 + "1", "..%2F..%2Fsegnode.db"):
        assert _get(node, f"/dicom-web/studies/{bad}").status_code in (400, 404), bad
        assert _get(node, f"/dicom-web/studies/{study}/series/{series}/instances/{bad}").status_code in (400, 404)
    assert _get(node, "/dicom-web/studies/1.02.3").status_code == 400
    assert _get(node, f"/dicom-web/studies/{study}/series/abc/metadata").status_code == 400
    assert _get(node, f"/dicom-web/studies/{study}/series/{series}/instances/1.2.x").status_code == 400
    for accept in ("image/jpeg", 'multipart/related; type="image/jpeg"', "application/dicom+json",
                   f"{DICOM_ACCEPT}; transfer-syntax=1.2.840.10008.1.2.4.50", f"{DICOM_ACCEPT}; q=0"):
        assert _get(node, instance, {"Accept": accept}).status_code == 406, accept
        assert _get(node, f"/dicom-web/studies/{study}", {"Accept": accept}).status_code == 406, accept

    node.settings.data.path(rows[3].path).unlink()  # a file gone from disk: an error, never an empty 200
    assert _get(node, f"/dicom-web/studies/{study}/series/{series}").status_code == 500
    assert _get(node, f"/dicom-web/studies/{study}/series/{series}/metadata").status_code == 500


def test_client_fetches_and_verifies_a_series(stored, tmp_path: Path):
    node, rows = stored
    study, series = rows[0].study_uid, rows[0].series_uid
    with httpx.Client(headers=TOKEN, timeout=30) as client:
        wanted = [(r.sop_instance_uid, r.sha256) for r in reversed(rows)]
        paths = retrieve_series(client, _base(node), study, series, wanted, tmp_path / "in")
        assert [p.name for p in paths] == [f"{i:05d}.dcm" for i in range(len(rows))]
        for path, row in zip(paths, reversed(rows)):
            assert path.read_bytes() == node.settings.data.path(row.path).read_bytes()
        assert sorted(p.name for p in (tmp_path / "in").iterdir()) == [p.name for p in paths]

        assert retrieve_instance(client, _base(node) + "/", study, series, rows[0].sop_instance_uid, None) \
            == paths[-1].read_bytes()
    with httpx.Client(base_url=_base(node), headers=TOKEN, timeout=30) as client:  # the address in the client
        assert retrieve_instance(client, "", study, series, rows[0].sop_instance_uid, rows[0].sha256) \
            == paths[-1].read_bytes()
    with httpx.Client(headers=TOKEN, timeout=30) as client:
        with pytest.raises(RetrieveError) as err:  # a hash mismatch: not retried
            retrieve_series(client, _base(node), study, series,
                            [(rows[0].sop_instance_uid, rows[0].sha256), (rows[1].sop_instance_uid, "0" * 64)],
                            tmp_path / "bad")
        assert err.value.retryable is False and "sha256" in str(err.value)
        assert list((tmp_path / "bad").iterdir()) == []  # nothing half-written is left
        with pytest.raises(RetrieveError) as err:
            retrieve_instance(client, _base(node), study, series, "1.2.3.4.5.6.7", None)
        assert err.value.retryable is False and err.value.status == 404
    with httpx.Client(timeout=30) as client, pytest.raises(RetrieveError) as err:  # no token
        retrieve_instance(client, _base(node), study, series, rows[0].sop_instance_uid, None)
    assert err.value.retryable is False and err.value.status == 401

    with socket.socket() as s:  # a port nothing listens on: a network error, retried
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with httpx.Client(timeout=5) as client, pytest.raises(RetrieveError) as err:
        retrieve_instance(client, f"http://127.0.0.1:{port}", study, series, rows[0].sop_instance_uid, None)
    assert err.value.retryable is True

    node.settings.data.path(rows[0].path).unlink()  # the node answers 500: retried
    with httpx.Client(headers=TOKEN, timeout=30) as client, pytest.raises(RetrieveError) as err:
        retrieve_instance(client, _base(node), study, series, rows[0].sop_instance_uid, None)
    assert err.value.retryable is True and err.value.status == 500


def test_multipart_parser():
    ctype = 'multipart/related; type="application/dicom"; boundary="b0"'
    body = (b"preamble\r\n--b0  \r\nContent-Type: application/dicom\r\n\r\nx\r\n--b0x\r\n--b0y\r\n--b0\t\r\n"
            b"\r\nsecond\r\n--b0--")
    parts = parse_multipart(body, ctype)
    assert parts == [({"content-type": "application/dicom"}, b"x\r\n--b0x\r\n--b0y"), ({}, b"second")]
    with pytest.raises(RetrieveError) as err:  # cut short: may pass when fetched again
        parse_multipart(b"--b0\r\nContent-Type: application/dicom\r\n\r\nabc", ctype)
    assert err.value.retryable is True
    for bad_type in ("application/dicom", "multipart/related; type=application/dicom"):
        with pytest.raises(RetrieveError) as err:
            parse_multipart(b"--b0--\r\n", bad_type)
        assert err.value.retryable is False
