"""WADO-RS (PS3.18 10.4): stored instances and their metadata, for hosts without the node's file system.

    GET /dicom-web/studies/{study}                                   every instance of the study
    GET /dicom-web/studies/{study}/series/{series}                   every instance of the series
    GET /dicom-web/studies/{study}/series/{series}/instances/{sop}   one instance (+ X-Segnode-SHA256)
    GET /dicom-web/studies/{study}/series/{series}/metadata          DICOM JSON, one object per instance
    GET /dicom-web/studies/{study}/series/{series}/instances/{sop}/metadata

Instances come back as multipart/related; type="application/dicom": each part is the stored PS3.10 file,
byte for byte (the transfer syntax it was stored in; no transcoding), streamed from disk a chunk at a time.
A client checks each part against the sha256 the index holds for it (segnode.remote.wado_client).

Files are found through the index only: a UID from the URL is validated and looked up, never put in a path.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from segnode.audit.ledger import Ledger
from segnode.config import Settings
from segnode.db.models import INSTANCES
from segnode.dicom.uids import is_valid_uid

log = logging.getLogger(__name__)

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
SHA256_HEADER = "X-Segnode-SHA256"
CHUNK = 256 * 1024  # bytes read from a file at a time
BULK_THRESHOLD = 1024  # bytes: a binary element longer than this is bulk data, left out of the metadata
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "OB/OW", "US or OW"})
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # float, double float and pixel data


def _split_unquoted(text: str, separator: str) -> list[str]:
    """`text` split at `separator` where it is not inside a quoted string."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _media_ranges(accept: str) -> list[tuple[str, dict[str, str]]]:
    """The Accept header's media ranges as (type/subtype lower-cased, {parameter: value}); q=0 ranges dropped.
    Commas and semicolons inside quoted values are kept."""
    ranges = []
    for item in _split_unquoted(accept, ","):
        fields = _split_unquoted(item, ";")
        media = fields[0].strip().lower()
        if not media:
            continue
        params: dict[str, str] = {}
        for field in fields[1:]:
            key, _, value = field.partition("=")
            if key.strip():
                params[key.strip().lower()] = value.strip().strip('"')
        try:
            if float(params.get("q", "1")) <= 0:
                continue
        except ValueError:
            pass
        ranges.append((media, params))
    return ranges


def _instances_acceptable(accept: str | None, syntaxes: set[str]) -> bool:
    """Whether the Accept header lets instances of these stored transfer syntaxes go out as they are:
    absent, */*, multipart/* or multipart/related (of application/dicom, or no type) whose transfer-syntax is
    absent, * or the stored one (every instance's, for several)."""
    if not accept or not accept.strip():
        return True
    for media, params in _media_ranges(accept):
        if media in ("*/*", "multipart/*"):
            return True
        if media != "multipart/related":
            continue
        if params.get("type", DICOM).lower() not in (DICOM, "application/*", "*/*"):
            continue
        wanted = params.get("transfer-syntax", "*")
        if wanted == "*" or syntaxes <= {wanted}:
            return True
    return False


def _metadata_acceptable(accept: str | None) -> bool:
    """Absent, */*, application/*, application/dicom+json or application/json."""
    if not accept or not accept.strip():
        return True
    return any(media in ("*/*", "application/*", DICOM_JSON, "application/json")
               for media, _ in _media_ranges(accept))


def _without_bulk(ds: Any) -> None:
    """Drop pixel data and every binary element longer than BULK_THRESHOLD, in sequences too (in place)."""
    for elem in list(ds):
        if elem.tag in PIXEL_TAGS:
            del ds[elem.tag]
        elif elem.VR == "SQ":
            for item in elem.value or []:
                _without_bulk(item)
        elif elem.VR in BINARY_VRS and elem.value is not None and len(elem.value) > BULK_THRESHOLD:
            del ds[elem.tag]


def wado_routes(settings: Settings, ledger: Ledger, authorize: Callable[..., str]) -> APIRouter:
    """The WADO-RS routes over the index (`instances`) and the data directory's stored files.

    Args:
        settings: the node's settings (the data directory the index's paths are relative to).
        ledger: its engine reads the index.
        authorize: the app's token check, called first by every route (401 when the token is wrong).

    Returns:
        A router for `app.include_router`. Answers: 400 for a UID in the URL that is not valid; 404 when
        nothing is indexed for it (or the instance is of another study or series); 406 when the Accept header
        asks only for what is not served (another media type, or a transfer syntax other than the stored one);
        500 when a file the index lists is missing or not the size indexed (logged with what to do).
    """
    router = APIRouter()
    data = settings.data

    def rows(study: str, series: str | None = None, sop: str | None = None) -> list[Any]:
        """The index rows asked for, in series then instance-number order (400 / 404)."""
        for name, uid in (("study", study), ("series", series), ("instance", sop)):
            if uid is not None and not is_valid_uid(uid):
                raise HTTPException(400, f"the {name} in the URL is not a valid UID")
        cols = (INSTANCES.c.sop_instance_uid, INSTANCES.c.study_uid, INSTANCES.c.series_uid, INSTANCES.c.path,
                INSTANCES.c.sha256, INSTANCES.c.size, INSTANCES.c.transfer_syntax_uid, INSTANCES.c.instance_number)
        if sop is not None:  # the unique index on sop_instance_uid, then the URL's study and series must agree
            query = select(*cols).where(INSTANCES.c.sop_instance_uid == sop)
        elif series is not None:
            query = select(*cols).where(INSTANCES.c.series_uid == series)
        else:
            query = select(*cols).where(INSTANCES.c.study_uid == study)
        with ledger.engine.connect() as conn:
            found = [r for r in conn.execute(query)
                     if r.study_uid == study and (series is None or r.series_uid == series)]
        if not found:
            what = "instance" if sop else "series" if series else "study"
            raise HTTPException(404, f"no {what} with this UID is stored here"
                                     + (" (in this study and series)" if sop or series else ""))
        found.sort(key=lambda r: (r.series_uid, r.instance_number is None, r.instance_number or 0,
                                  r.sop_instance_uid))
        return found

    def files(found: list[Any]) -> list[Path]:
        """Each row's file, checked present and of the indexed size before anything is sent (500 otherwise)."""
        paths = []
        for row in found:
            path = data.path(row.path)
            try:
                size = os.stat(path).st_size
            except OSError as exc:
                log.error("WADO-RS: instance %s is indexed at %s but the file cannot be read (%s); restore the "
                          "data directory from a backup or have the sender store the study again",
                          row.sop_instance_uid, row.path, exc.strerror or exc)
                raise HTTPException(500, "a stored file listed in the index is missing; the node's log names it")
            if size != row.size:
                log.error("WADO-RS: instance %s at %s is %d bytes, the index says %d; the file was changed outside "
                          "the node: restore it from a backup or have the sender store the study again",
                          row.sop_instance_uid, row.path, size, row.size)
                raise HTTPException(500, "a stored file does not match the index; the node's log names it")
            paths.append(path)
        return paths

    def stream(request: Request, found: list[Any], paths: list[Path], boundary: str) -> Iterator[bytes]:
        base = str(request.base_url).rstrip("/")
        for row, path in zip(found, paths):
            location = (f"{base}/dicom-web/studies/{row.study_uid}/series/{row.series_uid}/instances/"
                        f"{row.sop_instance_uid}")
            yield (f"--{boundary}\r\nContent-Type: {DICOM};transfer-syntax={row.transfer_syntax_uid}\r\n"
                   f"Content-Location: {location}\r\n\r\n").encode("ascii")
            try:
                with open(path, "rb") as f:
                    while chunk := f.read(CHUNK):
                        yield chunk
            except OSError:  # gone since it was checked: the client sees a body without its close delimiter
                log.exception("WADO-RS: instance %s (%s) could not be read while it was sent; the answer was cut "
                              "short: restore the file or have the sender store the study again",
                              row.sop_instance_uid, row.path)
                raise
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode("ascii")

    def retrieve(request: Request, study: str, series: str | None = None, sop: str | None = None
                 ) -> StreamingResponse:
        authorize(request)
        accept = request.headers.get("accept")
        if not _instances_acceptable(accept, set()):  # nothing in it could be instances, whatever is stored
            raise HTTPException(406, 'instances are served as multipart/related; type="application/dicom" only')
        found = rows(study, series, sop)
        if not _instances_acceptable(accept, {r.transfer_syntax_uid for r in found}):
            stored = ", ".join(sorted({r.transfer_syntax_uid for r in found}))
            raise HTTPException(406, f"instances are served in the transfer syntax they were stored in ({stored}): "
                                     "ask for that one or transfer-syntax=*")
        paths = files(found)
        boundary = uuid.uuid4().hex
        headers = {SHA256_HEADER: found[0].sha256} if sop is not None else {}
        return StreamingResponse(stream(request, found, paths, boundary), headers=headers,
                                 media_type=f'multipart/related; type="{DICOM}"; boundary={boundary}')

    def metadata(request: Request, study: str, series: str, sop: str | None = None) -> StreamingResponse:
        from pydicom import dcmread

        authorize(request)
        if not _metadata_acceptable(request.headers.get("accept")):
            raise HTTPException(406, f"metadata is served as {DICOM_JSON} only")
        found = rows(study, series, sop)
        paths = files(found)

        def objects() -> Iterator[bytes]:
            yield b"["
            for i, (row, path) in enumerate(zip(found, paths)):
                try:
                    ds = dcmread(path, stop_before_pixels=True)
                except Exception:
                    log.exception("WADO-RS: instance %s (%s) could not be read for its metadata; the answer was "
                                  "cut short: restore the file or have the sender store the study again",
                                  row.sop_instance_uid, row.path)
                    raise
                _without_bulk(ds)
                body = ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, suppress_invalid_tags=True)
                yield (b"," if i else b"") + json.dumps(body, separators=(",", ":")).encode("utf-8")
            yield b"]"

        return StreamingResponse(objects(), media_type=DICOM_JSON)

    @router.get("/dicom-web/studies/{study}")
    def retrieve_study(request: Request, study: str) -> StreamingResponse:
        """WADO-RS: every instance of the study, as stored (multipart/related of application/dicom)."""
        return retrieve(request, study)

    @router.get("/dicom-web/studies/{study}/series/{series}")
    def retrieve_series(request: Request, study: str, series: str) -> StreamingResponse:
        """WADO-RS: every instance of the series in instance-number order, as stored."""
        return retrieve(request, study, series)

    @router.get("/dicom-web/studies/{study}/series/{series}/instances/{sop}")
    def retrieve_instance(request: Request, study: str, series: str, sop: str) -> StreamingResponse:
        """WADO-RS: one instance as stored, its indexed sha256 in the X-Segnode-SHA256 header."""
        return retrieve(request, study, series, sop)

    @router.get("/dicom-web/studies/{study}/series/{series}/metadata")
    def series_metadata(request: Request, study: str, series: str) -> StreamingResponse:
        """WADO-RS: the series' DICOM JSON without pixel data or other bulk data, one object per instance."""
        return metadata(request, study, series)

    @router.get("/dicom-web/studies/{study}/series/{series}/instances/{sop}/metadata")
    def instance_metadata(request: Request, study: str, series: str, sop: str) -> StreamingResponse:
        """WADO-RS: one instance's DICOM JSON (an array of one object) without bulk data."""
        return metadata(request, study, series, sop)

    return router
