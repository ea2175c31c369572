"""A WADO-RS client for remote workers: fetch a series' instances from the node and check each one's sha256.

One request per instance (GET .../instances/{sop}): memory holds one instance at a time, a failure names the
instance, and each part is checked against the sha256 the node's index holds for it before it is written.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import httpx

from segnode.dicom.uids import is_valid_uid
from segnode.errors import SegnodeError

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
MAX_PADDING = 1024  # bytes of RFC 2046 transport padding (spaces, tabs) accepted after a delimiter


class RetrieveError(SegnodeError, RuntimeError):
    """An instance could not be fetched, or what came back is not what the node indexed.

    Attributes:
        retryable: True for what may pass later unchanged (a connection or timeout error, a 5xx or 429
            answer, a body cut short); False for a 4xx answer (404: not stored there; 401/403: the token), a
            malformed answer, or bytes whose sha256 differs from the one expected.
        status: the HTTP status when the node answered one, else None.
    """

    def __init__(self, message: str, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


def _params(content_type: str) -> tuple[str, dict[str, str]]:
    main, _, rest = content_type.partition(";")
    params: dict[str, str] = {}
    for item in rest.split(";"):
        key, _, value = item.partition("=")
        if key.strip():
            params[key.strip().lower()] = value.strip().strip('"')
    return main.strip().lower(), params


def _delimiter_at(body: bytes, start: int, delim: bytes) -> tuple[int, int, bool] | None:
    """The next delimiter line at or after `start` (RFC 2046: CRLF "--" boundary, then "--" for the close
    delimiter, transport padding, CRLF; the first one may open the body without its CRLF):
    (where it starts, where the next part's headers start, whether it closes the body), or None."""
    i = start
    while True:
        if i == 0 and body.startswith(delim):
            at, k = 0, len(delim)
        else:
            found = body.find(b"\r\n" + delim, i)
            if found < 0:
                return None
            at, k = found, found + 2 + len(delim)
        closing = body[k:k + 2] == b"--"
        m = k + 2 if closing else k
        n = m
        while n < len(body) and body[n] in b" \t" and n - m < MAX_PADDING:
            n += 1
        if body[n:n + 2] == b"\r\n":
            return at, n + 2, closing
        if closing and n == len(body):  # the close delimiter at the very end, without its CRLF
            return at, n, True
        i = at + 1  # the boundary's characters inside content, not a delimiter line: look further


def parse_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart body: [(headers with lower-cased names, content bytes)], in order.

    Raises:
        RetrieveError: not multipart, no boundary, or malformed (retryable False); no close delimiter (the
            body was cut short: retryable True).
    """
    media, params = _params(content_type)
    if not media.startswith("multipart/"):
        raise RetrieveError(f"expected a multipart answer, got Content-Type {content_type[:100]!r}", False)
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > 70:
        raise RetrieveError("the multipart answer's Content-Type has no valid boundary parameter", False)
    delim = b"--" + boundary.encode("latin-1")
    first = _delimiter_at(body, 0, delim)
    if first is None:
        raise RetrieveError("the multipart answer holds no boundary delimiter (cut short?)", True)
    parts: list[tuple[dict[str, str], bytes]] = []
    _, pos, closing = first
    while not closing:
        nxt = _delimiter_at(body, pos, delim)
        if nxt is None:
            raise RetrieveError("the multipart answer ends without its close delimiter (cut short)", True)
        at, after, closing = nxt
        part = body[pos:at]
        if part.startswith(b"\r\n"):  # no header lines
            head, content = b"", part[2:]
        else:
            end = part.find(b"\r\n\r\n")
            if end < 0:
                raise RetrieveError("a part of the multipart answer has no blank line after its headers", False)
            head, content = part[:end], part[end + 4:]
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n") if head else []:
            name, sep, value = line.partition(":")
            if not sep:
                raise RetrieveError(f"a malformed part header line {line[:80]!r}", False)
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
        pos = after
    return parts


def _check_uid(name: str, uid: str) -> None:
    if not is_valid_uid(uid):
        raise RetrieveError(f"the {name} {uid[:80]!r} is not a valid UID", False)


def retrieve_instance(client: httpx.Client, base_url: str, study: str, series: str, sop: str,
                      sha256: str | None) -> bytes:
    """One stored instance over WADO-RS, as the node stored it.

    Args:
        client: carries the node's token (`Authorization: Bearer ...`), TLS settings and timeouts.
        base_url: the node's address, e.g. "https://node:8080" (the /dicom-web/... path is added); "" when
            `client` was made with the node's address as its base_url.
        study, series, sop: the instance's Study, Series and SOP Instance UIDs.
        sha256: the hex sha256 the node's index holds for it; None to skip the check.

    Returns:
        The PS3.10 file's bytes (the whole instance is held in memory).

    Raises:
        RetrieveError: retryable True for a network error or timeout, a 5xx or 429 answer or a body cut short;
            False for an invalid UID, any other 4xx answer (404: not stored on the node), a malformed
            answer, a part count other than one, or bytes whose sha256 is not `sha256`.
    """
    for name, uid in (("study", study), ("series", series), ("instance", sop)):
        _check_uid(name, uid)
    url = f"{base_url.rstrip('/')}/dicom-web/studies/{study}/series/{series}/instances/{sop}"
    try:
        rsp = client.get(url, headers={"Accept": ACCEPT})
    except httpx.HTTPError as exc:
        raise RetrieveError(f"instance {sop}: {type(exc).__name__}: {exc}", True) from exc
    if rsp.status_code != 200:
        detail = rsp.text[:200] if rsp.headers.get("content-type", "").startswith("application/json") else ""
        raise RetrieveError(f"instance {sop}: HTTP {rsp.status_code} from {url} {detail}".rstrip(),
                            rsp.status_code >= 500 or rsp.status_code == 429, rsp.status_code)
    parts = parse_multipart(rsp.content, rsp.headers.get("content-type", ""))
    if len(parts) != 1:
        raise RetrieveError(f"instance {sop}: expected one part, the answer holds {len(parts)}", False)
    headers, content = parts[0]
    media, _ = _params(headers.get("content-type", "application/dicom"))
    if media != "application/dicom":
        raise RetrieveError(f"instance {sop}: a part of type {media[:80]!r}, not application/dicom", False)
    if sha256 is not None:
        got = hashlib.sha256(content).hexdigest()
        if got != sha256.lower():
            raise RetrieveError(f"instance {sop}: sha256 {got} of the {len(content)} bytes received is not the "
                                f"{sha256} expected (the instance changed on the node, or was damaged)", False)
    return content


def retrieve_series(client: httpx.Client, base_url: str, study: str, series: str,
                    instances: Sequence[tuple[str, str | None]], folder: Path) -> list[Path]:
    """Fetch instances of a series into `folder`, each checked against its sha256 (see `retrieve_instance`).

    Args:
        client, base_url: as for `retrieve_instance`.
        study, series: the Study and Series Instance UIDs.
        instances: (SOP Instance UID, hex sha256 or None) of each instance, in the order wanted.
        folder: created if missing. File i of `instances` is written as `folder / f"{i:05d}.dcm"` (names
            never come from a UID), through a temporary name and a rename.

    Returns:
        The files' paths, in the order of `instances`.

    Raises:
        RetrieveError: the first instance that could not be fetched or verified (its `retryable` as in
            `retrieve_instance`); the files this call wrote before it are removed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for i, (sop, sha256) in enumerate(instances):
            content = retrieve_instance(client, base_url, study, series, sop, sha256)
            path = folder / f"{i:05d}.dcm"
            tmp = folder / f".{i:05d}.dcm.part"
            try:
                tmp.write_bytes(content)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written
