"""STOW-RS (PS3.18 10.5): multipart/related parts streamed into the spool one at a time.

Each part's own file meta is parsed from its first bytes and replaced by ours; the dataset bytes
are written as they arrive, so a request of any size needs memory for one network chunk only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from python_multipart.multipart import MultipartParser

from segnode.errors import InputError
from segnode.dicom import sop_classes
from segnode.dicom import status as st
from segnode.dicom.part10 import MAX_META, Meta, NotPart10, file_meta, parse_meta
from segnode.dicom.uids import TRANSFER_SYNTAXES, is_valid_uid
from segnode.ingest.spool import SpoolWriter
from segnode.flow import StoreResult
from segnode.ingest.store import Peer, Received, RefusalTally, StoreService

log = logging.getLogger(__name__)

MAX_PREAMBLE = 64 * 1024  # bytes before the first boundary (RFC 2046 preamble) read at most
MAX_PADDING = 1024  # bytes of transport padding (spaces, tabs) after a delimiter that are dropped


class TransportPadding:
    """Drops RFC 2046 5.1.1 transport padding - spaces and tabs between a boundary delimiter (or the close
    delimiter) and its CRLF - from a body streamed in chunks; python-multipart refuses it ("Did not find CR
    at end of boundary"). The body must start at its first delimiter (the preamble already dropped). Holds
    back only what could still be a delimiter line, so memory stays at a chunk.
    """

    def __init__(self, delimiter: bytes) -> None:
        self.needle = b"\r\n" + delimiter
        self._held = b"\r\n"  # the first delimiter opens the body: searched for as if a line ended before it
        self._started = False

    def feed(self, data: bytes, final: bool = False) -> bytes:
        """The next bytes for the parser; `final` at the end of the body (nothing is held back then)."""
        buf = self._held + data if self._held else data
        out, pos, n, needle = [], 0, len(buf), self.needle
        while True:
            i = buf.find(needle, pos)
            if i < 0:
                keep = n
                if not final:  # a delimiter may begin at the end of this chunk (at a CR: the needle's first byte)
                    k = buf.find(b"\r", max(pos, n - len(needle) + 1))
                    while k >= 0:
                        if needle.startswith(buf[k:]):
                            keep = k
                            break
                        k = buf.find(b"\r", k + 1)
                out.append(buf[pos:keep])
                self._held = buf[keep:]
                break
            k = i + len(needle)
            if buf[k:k + 2] == b"--":
                k += 2
            m = k
            while m < n and buf[m] in b" \t" and m - k < MAX_PADDING:
                m += 1
            if not final and m + 2 > n and m - k < MAX_PADDING:  # cannot tell yet: wait for the next chunk
                out.append(buf[pos:i])
                self._held = buf[i:]
                break
            out.append(buf[pos:k])
            pos = m if m > k and (buf[m:m + 2] == b"\r\n" or m == n) else k
        result = b"".join(out)
        if not self._started and result:  # drop the CRLF put before the first delimiter
            result, self._started = result[2:], True
        return result


class BadRequest(InputError):
    """The request body is not a well-formed multipart/related message."""


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    head: bytearray = field(default_factory=bytearray)
    meta: Meta | None = None
    writer: SpoolWriter | None = None
    failure: StoreResult | None = None
    dataset_offset: int = 0


class StowSession:
    """Feeds one request body through the multipart parser, storing each part when it ends.

    The parser callbacks (on `feed`) only spool bytes; parts that have ended wait in `finished`
    until `store_finished` commits them off the event loop. A part is refused, never failing the
    request, when it is not application/dicom (0xC210), has no PS3.10 file meta in its first 64 KiB
    (0xC210) or none naming its SOP Class/Instance UID (0xC211), or the disk is below the floor or a
    write fails (0xA700).

    Args:
        store: where parts are committed.
        boundary: the multipart boundary from the request's Content-Type.
        peer: the caller, for the index and the audit trail.
        study_uid: the study in the URL (/dicom-web/studies/{study}); parts of another study are
            refused (0xA900). None: any study.

    Attributes:
        results: one StoreResult per part stored or refused so far, in request order.
        finished: parts that ended and still wait for `store_finished`.
    """

    def __init__(self, store: StoreService, boundary: str, peer: Peer, study_uid: str | None) -> None:
        self.store, self.peer, self.study_uid = store, peer, study_uid
        self.delimiter = b"--" + boundary.encode("latin-1")
        self._preamble: bytearray | None = bytearray()  # None once the first delimiter is found
        self._padding = TransportPadding(self.delimiter)
        self.results: list[StoreResult] = []
        self.tally = RefusalTally()  # one event for the refusals after the first of each status
        self.finished: list[_Part] = []
        self._part: _Part | None = None
        self._field, self._value = bytearray(), bytearray()
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done,
            "on_part_data": self._data,
            "on_part_end": self._end,
        })

    def feed(self, chunk: bytes) -> None:
        """Parse the next chunk of the body (cheap: run on the event loop).

        Raises:
            BadRequest: the body is not well-formed multipart.
        """
        if self._preamble is not None:  # RFC 2046 5.1.1: a preamble before the first delimiter is ignored
            self._preamble += chunk
            start = self._first_delimiter(self._preamble)
            if start is None:
                if len(self._preamble) > MAX_PREAMBLE:
                    raise BadRequest(f"malformed multipart body: no boundary in its first {MAX_PREAMBLE} bytes")
                return
            chunk, self._preamble = bytes(self._preamble[start:]), None
        self._parse(self._padding.feed(chunk))

    def _parse(self, data: bytes) -> None:
        try:
            self.parser.write(data)
        except Exception as exc:  # python-multipart raises its own error types
            raise BadRequest(f"malformed multipart body: {exc}") from exc

    def _first_delimiter(self, head: bytearray) -> int | None:
        """Where the first delimiter line starts in `head` (at its start or after a CRLF), if it is there yet."""
        if head.startswith(self.delimiter):
            return 0
        found = head.find(b"\r\n" + self.delimiter)
        return None if found < 0 else found + 2

    def close(self) -> None:
        """End of body: check the closing boundary was seen (an epilogue after it is ignored).

        Raises:
            BadRequest: the body is malformed or ends inside a part (whose temp file is removed).
        """
        if self._preamble is not None:
            raise BadRequest("malformed multipart body: no boundary in it")
        self._parse(self._padding.feed(b"", final=True))
        try:
            self.parser.finalize()
        except Exception as exc:
            raise BadRequest(f"malformed multipart body: {exc}") from exc
        if self._part is not None:
            self.discard()
            raise BadRequest("the multipart body ended inside a part")

    def discard(self) -> None:
        """Drop the part in progress, removing its temp file and closing it at once: the request ended
        before the part did (the client went away, the body was malformed or cut). Never acknowledged, so
        nothing is lost; parts that ended before were committed as they ended."""
        part, self._part = self._part, None
        if part is not None and part.writer is not None:
            part.writer.abort()
            part.writer = None

    # -- parser callbacks (event loop thread: cheap work only) ----------------------------------
    def _begin(self) -> None:
        self._part = _Part()

    def _header_end(self) -> None:
        assert self._part is not None
        self._part.headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _headers_done(self) -> None:
        part = self._part
        assert part is not None
        ctype = part.headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        if ctype != "application/dicom":
            part.failure = StoreResult.refused(st.CANNOT_UNDERSTAND, f"part is {ctype}, not application/dicom")
        elif self.store.below_floor():
            part.failure = StoreResult.refused(st.OUT_OF_RESOURCES, "disk below the free-space floor")

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        assert part is not None
        if part.failure is not None:
            return
        chunk = data[start:end]
        if part.writer is not None:
            self._write(part, chunk)
            return
        part.head += chunk
        try:
            meta = parse_meta(bytes(part.head))
        except NotPart10 as exc:
            part.failure = StoreResult.refused(st.CANNOT_UNDERSTAND, f"not a DICOM PS3.10 file: {exc}")
            return
        if meta is None:
            if len(part.head) > MAX_META:
                part.failure = StoreResult.refused(st.CANNOT_UNDERSTAND, "not a DICOM PS3.10 file")
            return
        if not (meta.sop_class_uid and meta.sop_instance_uid):
            part.failure = StoreResult.refused(st.MISSING_IDENTIFIER, "file meta lacks the Media Storage SOP Class/Instance UID", sop_class_uid=meta.sop_class_uid, sop_instance_uid=meta.sop_instance_uid)
            return
        why = sop_classes.refusal(meta.sop_class_uid, self.store.sop_classes)
        if why is not None:  # as DIMSE refuses it at negotiation
            part.failure = StoreResult.refused(st.SOP_CLASS_NOT_SUPPORTED, f"SOP class refused: {why}",
                                               sop_class_uid=meta.sop_class_uid, sop_instance_uid=meta.sop_instance_uid)
            return
        if meta.transfer_syntax_uid not in TRANSFER_SYNTAXES:  # the pixels could never be read
            shown = meta.transfer_syntax_uid[:64] if is_valid_uid(meta.transfer_syntax_uid) else "(not a valid UID)"
            part.failure = StoreResult.refused(st.TRANSFER_SYNTAX_NOT_SUPPORTED,
                                               f"transfer syntax {shown or '(none)'} is not supported",
                                               sop_class_uid=meta.sop_class_uid, sop_instance_uid=meta.sop_instance_uid)
            return
        part.meta = meta
        ours = file_meta(meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax_uid)
        part.dataset_offset = len(ours)
        try:
            part.writer = self.store.open_writer(self.peer)
        except OSError as exc:  # a full disk: the part is refused (0xA700), the request goes on
            self._write_failed(part, exc)
            return
        self._write(part, ours)
        self._write(part, bytes(part.head[meta.dataset_offset:]))
        part.head = bytearray()

    def _write(self, part: _Part, chunk: bytes) -> None:
        if part.writer is None:  # an earlier write of this part failed
            return
        try:
            part.writer.write(chunk)
        except OSError as exc:
            self._write_failed(part, exc)

    def _write_failed(self, part: _Part, exc: OSError) -> None:
        if part.writer is not None:
            part.writer.abort()
            part.writer = None
        meta = part.meta
        part.failure = StoreResult.refused(st.OUT_OF_RESOURCES, f"write failed: {exc.strerror}",
                                           sop_class_uid=meta.sop_class_uid if meta else "",
                                           sop_instance_uid=meta.sop_instance_uid if meta else "")

    def _end(self) -> None:
        part = self._part
        assert part is not None
        self._part = None
        if part.failure is None and part.meta is None:
            part.failure = StoreResult.refused(st.CANNOT_UNDERSTAND, "not a DICOM PS3.10 file")
        self.finished.append(part)

    # -- storage (worker thread) ----------------------------------------------------------------
    def store_finished(self) -> None:
        """Commit or refuse every part that has ended, appending to `results`; blocking I/O, run off
        the event loop."""
        parts, self.finished = self.finished, []
        for part in parts:
            self.results.append(self._store(part))

    def _store(self, part: _Part) -> StoreResult:
        if part.failure is not None:
            if part.writer is not None:
                part.writer.abort()
            return self.store.refuse(self.peer, part.failure, tally=self.tally)
        assert part.writer is not None and part.meta is not None
        meta = part.meta
        rec = Received(tmp_path=part.writer.path, size=part.writer.size,
                       transfer_syntax_uid=meta.transfer_syntax_uid, dataset_offset=part.dataset_offset)
        return self.store.receive(part.writer, rec, self.peer, meta.sop_class_uid, meta.sop_instance_uid,
                                  tally=self.tally, check=self._in_study)

    def _in_study(self, rec: Received) -> StoreResult | None:
        """Parts of another study than the URL's are refused (0xA900)."""
        if self.study_uid and rec.ids.study_uid != self.study_uid:
            return StoreResult.refused(st.DATASET_MISMATCH, "Study Instance UID differs from the one in the request URL",
                                       sop_class_uid=rec.ids.sop_class_uid, sop_instance_uid=rec.ids.sop_instance_uid)
        return None

    def summarize(self) -> None:
        """Audit the refusals only counted so far as one event (blocking: off the event loop)."""
        self.store.summarize(self.peer, self.tally, "STOW-RS request")


def _uid_attr(vr: str, value: str) -> dict[str, Any]:
    return {"vr": vr, "Value": [value]} if value else {"vr": vr}


def response_body(results: list[StoreResult]) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 10.5.3) in the DICOM JSON model (PS3.18 Annex F).

    Referenced SOP Sequence (0008,1199) lists the stored parts (duplicates and overwrites included),
    Failed SOP Sequence (0008,1198) the refused ones with their DIMSE status as Failure Reason
    (0008,1197); a UID that is not valid is left out rather than echoed. A sequence with no item is
    omitted.
    """
    body: dict[str, Any] = {}
    ok = [r for r in results if r.status == st.SUCCESS]
    failed = [r for r in results if r.status != st.SUCCESS]
    if ok:
        body["00081199"] = {"vr": "SQ", "Value": [
            {"00081150": _uid_attr("UI", r.sop_class_uid), "00081155": _uid_attr("UI", r.sop_instance_uid)} for r in ok]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [
            {"00081150": _uid_attr("UI", r.sop_class_uid if is_valid_uid(r.sop_class_uid) else ""),
             "00081155": _uid_attr("UI", r.sop_instance_uid if is_valid_uid(r.sop_instance_uid) else ""),
             "00081197": {"vr": "US", "Value": [r.status]}} for r in failed]}
    return body


def http_status(results: list[StoreResult]) -> int:
    """The STOW-RS HTTP status for these results.

    Returns:
        200 all stored, 202 some failed, 409 none stored, 503 none stored for lack of space (every
        refusal 0xA700: retrying later may succeed, hence the caller's Retry-After).
    """
    failed = [r for r in results if r.status != st.SUCCESS]
    if not failed:
        return 200
    if len(failed) < len(results):
        return 202
    if all(r.status == st.OUT_OF_RESOURCES for r in failed):
        return 503
    return 409
