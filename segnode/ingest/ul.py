"""DICOM Upper Layer acceptor for one association: negotiation, P-DATA, release, abort.

pynetdicom encodes and decodes the association PDUs and negotiates presentation contexts; this
module only moves bytes. It exists because pynetdicom's acceptor polls its queues with 1 ms
sleeps several times per message: a bare pynetdicom file writer took 2.3 s for 300 CT slices of
512 KB here (storescp: 0.40 s). This blocking loop, streaming each dataset fragment into the
spool file as it arrives, takes 0.8-0.9 s for the same slices including hashing, validation,
index and audit (fsync off; bench/ingest.py).
"""

from __future__ import annotations

import functools
import logging
import math
import select
import socket
import ssl
import struct
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from pynetdicom import build_context
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import

from segnode.audit import events as audit
from segnode.errors import SegnodeError
from segnode.dicom.uids import TRANSFER_SYNTAXES
from segnode.dicom import dimse, sop_classes
from segnode.dicom import status as st
from segnode.dicom.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, file_meta
from segnode.flow import StoreResult
from segnode.ingest import spool
from segnode.ingest.store import Peer, Received, RefusalTally, StoreService

if TYPE_CHECKING:
    from segnode.config import DimseConfig, SopClassPolicy
    from segnode.ingest.spool import SpoolWriter

log = logging.getLogger(__name__)

VERIFICATION_CONTEXT = build_context(Verification)


@functools.lru_cache(maxsize=1024)  # the standard's ~200 classes and a bounded set of private ones
def _storage_context(sop_class_uid: str) -> PresentationContext:
    # JPIP transfer syntaxes reference pixel data held elsewhere: nothing to segment, never offered
    return build_context(sop_class_uid, list(TRANSFER_SYNTAXES))


def warm_contexts() -> None:
    """Build the standard storage classes' contexts now (~0.1 s), at listener start, not in a modality's first
    association: each one validates its two dozen transfer syntax UIDs."""
    for uid in sop_classes.STANDARD_STORAGE:
        _storage_context(uid)


def supported_contexts(requested: list[PresentationContext], policy: "SopClassPolicy") -> list[PresentationContext]:
    """The contexts we would accept for what the peer proposes: Verification, and each proposed abstract
    syntax that is a SOP class we store (segnode.dicom.sop_classes: the standard's storage classes and private
    ones, narrowed by the policy), with every transfer syntax we can read."""
    wanted = {str(cx.abstract_syntax) for cx in requested if cx.abstract_syntax is not None}
    return [VERIFICATION_CONTEXT] + [_storage_context(uid) for uid in sorted(wanted)
                                     if uid != Verification and sop_classes.refusal(uid, policy) is None]

SPARE_BUFFERS = 8  # PDU buffers an association keeps for reuse
MAX_ASSOCIATE_RQ = 1024 * 1024  # bytes; read before the peer is identified, so capped apart from max_pdu

# presentation context results, PS3.8 9.3.3.2
_CONTEXT_RESULT = {1: "user rejection", 2: "no reason", 3: "abstract syntax not supported",
                   4: "transfer syntaxes not supported"}
# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
RJ_CALLING_AE = (1, 1, 3)
RJ_CALLED_AE = (1, 1, 7)
RJ_LOCAL_LIMIT = (2, 3, 2)
# A-ABORT (source, reason), PS3.8 9.3.8
AB_UNEXPECTED_PDU = (2, 2)
AB_INVALID_PARAMETER = (2, 6)
AB_UNRECOGNIZED_PDU = (2, 1)
AB_NOT_SPECIFIED = (2, 0)


class PeerGone(SegnodeError):
    """The peer closed the connection (recv returned 0); the association ends without an A-ABORT.
    Timeouts surface as socket.timeout instead."""


class Abort(SegnodeError):
    """Abort the association with (source, reason) after recording why.

    Args:
        source_reason: the A-ABORT source and reason (PS3.8 9.3.8), one of the AB_* constants.
        why: the audit detail and log message.
        security: audit as a Security Alert (e.g. an oversized PDU) rather than Application Activity.
    """

    def __init__(self, source_reason: tuple[int, int], why: str, security: bool = False) -> None:
        super().__init__(why)
        self.source_reason, self.security = source_reason, security


@dataclass
class Context:
    """An accepted presentation context: its abstract syntax (SOP Class UID) and the one transfer
    syntax UID negotiated for it, in which its datasets arrive."""

    abstract_syntax: str
    transfer_syntax: str


class Association:
    """Serve one connection until release, abort or timeout. Never raises.

    Each C-STORE dataset is streamed into a spool temp file as its P-DATA fragments arrive and
    committed (or refused) through the store when its last fragment is in; the C-STORE-RSP carries
    the resulting DIMSE status. C-ECHO is answered; any other DIMSE command aborts the association.

    Args:
        sock: the connected socket (already TLS-wrapped when TLS is on).
        address: the peer's (IP, port).
        cfg: AE title, allow list, called-AE check, max PDU (bytes), ACSE and network timeouts (s).
        store: where datasets are committed and events audited.
        admit: asked once the peer is identified: None to accept, else why to reject (transient).
    """

    def __init__(self, sock: socket.socket, address: tuple[str, int], cfg: "DimseConfig", store: StoreService,
                 admit: Callable[[], str | None], accepted_at: float | None = None) -> None:
        self.sock, self.cfg, self.store, self.admit = sock, cfg, store, admit
        # A plain TCP socket is read and written non-blocking, polled only when it has to wait: with a timeout
        # set, each read cost three system calls (timeout, poll, read). A TLS socket keeps its timeouts.
        self._poll: select.poll | None = None
        if not isinstance(sock, ssl.SSLSocket):
            sock.setblocking(False)
            self._poll = select.poll()
            self._poll.register(sock, select.POLLIN)
        self.peer = Peer("dimse", address[0], address[1])
        self.contexts: dict[int, Context] = {}
        self.peer_max_pdu = 0
        # ARTIM (PS3.8 9.1.5): the whole A-ASSOCIATE-RQ must be in within acse_timeout of the TCP accept
        self.deadline = (accepted_at if accepted_at is not None else time.monotonic()) + cfg.acse_timeout
        self.tally = RefusalTally()  # refusals after the first of each status are summarized at the end
        self.admitted = False
        self._spare: list[bytearray] = []  # PDU buffers to reuse (see `_buffer`)
        self._next_writer: Future[SpoolWriter] | None = None  # the next dataset's temp file (see `_open_writer`)
        self._lent: list[bytearray] = []
        self._reset_message()

    # -- socket ---------------------------------------------------------------------------------
    def _recv_into(self, view: memoryview) -> None:
        """Fill `view` before `self.deadline` (monotonic s): a peer that trickles bytes is cut off at the
        deadline, not merely when one read waits too long.

        Raises:
            socket.timeout: the deadline passed. PeerGone: the peer closed the connection.
        """
        while view:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("deadline passed")
            if self._poll is None:
                self.sock.settimeout(remaining)
                n = self.sock.recv_into(view)
            else:  # non-blocking: a read finds the bytes already there, waiting only when none came yet
                try:
                    n = self.sock.recv_into(view)
                except BlockingIOError:
                    self._wait(select.POLLIN, remaining)
                    continue
            if n == 0:
                raise PeerGone("peer closed the connection")
            view = view[n:]

    def _wait(self, event: int, remaining: float) -> None:
        """Wait until the (non-blocking) socket is ready for `event`, or `remaining` s pass (the caller then
        finds its deadline passed)."""
        assert self._poll is not None
        self._poll.modify(self.sock, event)
        self._poll.poll(math.ceil(remaining * 1000))

    def _read_pdu(self, limit: int) -> tuple[int, memoryview]:
        """One whole PDU, before `self.deadline` (set per PDU while serving)."""
        header = bytearray(6)
        self._recv_into(memoryview(header))
        pdu_type, length = header[0], struct.unpack_from(">I", header, 2)[0]
        if length > limit:
            raise Abort(AB_INVALID_PARAMETER, f"PDU of {length} bytes exceeds the {limit}-byte cap", security=True)
        if self.admitted:
            view = memoryview(self._buffer(length))[:length]
            self._recv_into(view)
            return pdu_type, view
        # not yet associated: memory grows with the bytes that came, not with the length the peer claims
        buf = bytearray(min(length, 1 << 16))
        self._recv_into(memoryview(buf))
        while len(buf) < length:
            got = len(buf)
            buf.extend(bytes(min(length, 2 * got) - got))
            self._recv_into(memoryview(buf)[got:])
        return pdu_type, memoryview(buf)

    def _buffer(self, length: int) -> bytearray:
        """A buffer of at least `length` bytes for the next PDU. A dataset's bytes are hashed on a helper
        thread after they are written (spool.BackgroundHash), so a PDU's buffer is reused only once no
        dataset is in progress: every message it carried has been stored or refused, its hash done."""
        if self.writer is None and self._lent:
            self._spare.extend(self._lent[: SPARE_BUFFERS - len(self._spare)])
            self._lent.clear()
        for i, spare in enumerate(self._spare):
            if len(spare) >= length:
                buf = self._spare.pop(i)
                break
        else:
            buf = bytearray(1 << max(16, (length - 1).bit_length()))  # powers of two: reusable for the next
        self._lent.append(buf)
        return buf

    def _send(self, data: bytes) -> None:
        """Send all of `data` before `self.deadline`.

        Raises:
            socket.timeout: the deadline passed first. OSError: the connection failed.
        """
        if self._poll is None:
            self.sock.sendall(data)
            return
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout("timed out") from None
                self._wait(select.POLLOUT, remaining)

    def _send_abort(self, source: int, reason: int) -> None:
        try:
            self._send(bytes([0x07, 0, 0, 0, 0, 4, 0, 0, source, reason]))
        except OSError:
            pass

    # -- association ----------------------------------------------------------------------------
    def run(self) -> None:
        """Negotiate, then serve P-DATA until A-RELEASE, A-ABORT, timeout or a protocol error.

        Rejections (A-ASSOCIATE-RJ) and protocol errors are logged and audited, a protocol error then
        answered with an A-ABORT; a timeout is logged and aborted; a dataset in progress is discarded
        (never acknowledged); the socket is always closed. Nothing is raised: an unexpected error is
        logged and aborted so the listener carries on.
        """
        try:
            if not self._associate():
                return
            self._serve()
        except PeerGone as exc:
            log.info("association from %s ended: %s", self.peer.label(), exc)
            if self.contexts or self.writer is not None:  # gone without release (not a port probe)
                self._audit(audit.APPLICATION_ACTIVITY, audit.Outcome.MINOR_FAILURE,
                            "association ended: the peer closed the connection without releasing it"
                            + (" (a dataset in progress was discarded)" if self.writer is not None else ""))
        except socket.timeout:
            log.warning("association from %s timed out; aborted", self.peer.label())
            self._audit(audit.APPLICATION_ACTIVITY, audit.Outcome.MINOR_FAILURE,
                        "association aborted: " + ("the peer sent no complete PDU within network_timeout"
                                                   if self.contexts else
                                                   "no complete association request within acse_timeout"))
            self._send_abort(*AB_NOT_SPECIFIED)
        except Abort as exc:  # recorded before the peer hears of it, so the record never lags the abort
            log.warning("aborting association from %s: %s", self.peer.label(), exc)
            code = audit.SECURITY_ALERT if exc.security else audit.APPLICATION_ACTIVITY
            self._audit(code, audit.Outcome.SERIOUS_FAILURE, f"association aborted: {exc}")
            self._send_abort(*exc.source_reason)
        except OSError as exc:
            log.info("association from %s: connection error %s", self.peer.label(), exc)
        except Exception:  # a bug must not take the listener down
            log.exception("association from %s failed unexpectedly; aborted", self.peer.label())
            self._send_abort(*AB_NOT_SPECIFIED)
        finally:
            if self.writer is not None:
                self.writer.abort()
            self._drop_next_writer()
            try:
                self.sock.close()
            except OSError:
                pass
            self.store.summarize(self.peer, self.tally, "association")

    def _audit(self, code: audit.EventType, outcome: audit.Outcome, detail: str) -> None:
        try:
            self.store.record(audit.Event(type=code, action=audit.Action.EXECUTE, outcome=outcome,
                                          actor=self.peer.actor(), detail=detail))
        except Exception:
            log.exception("could not write the audit event: %s", detail)

    def _associate(self) -> bool:
        pdu_type, body = self._read_pdu(MAX_ASSOCIATE_RQ)
        if pdu_type != 0x01:
            raise Abort(AB_UNEXPECTED_PDU, f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(b"\x01\x00" + struct.pack(">I", len(body)) + bytes(body))
            rq = pdu.to_primitive()
        except Exception as exc:
            raise Abort(AB_INVALID_PARAMETER, f"malformed A-ASSOCIATE-RQ: {exc}") from exc
        calling, called = rq.calling_ae_title.strip(), rq.called_ae_title.strip()
        self.peer = Peer("dimse", self.peer.host, self.peer.port, ae_title=calling, called_ae_title=called)
        reject = self._check_peer(calling, called)
        if reject is not None:
            self._send(bytes([0x03, 0, 0, 0, 0, 4, 0, *reject]))
            return False
        self.peer_max_pdu = rq.maximum_length_received or 0
        roles = {item.sop_class_uid: (item.scu_role, item.scp_role) for item in rq.user_information
                 if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid is not None}
        requested = rq.presentation_context_definition_list
        results, ac_roles = negotiate_as_acceptor(requested, supported_contexts(requested, self.store.sop_classes),
                                                  roles or None)
        self.contexts = {int(cx.context_id or 0): Context(str(cx.abstract_syntax), cx.transfer_syntax[0])
                         for cx in results if cx.result == 0}
        ac = A_ASSOCIATE()
        ac.application_context_name = rq.application_context_name
        ac.calling_ae_title, ac.called_ae_title = rq.calling_ae_title, rq.called_ae_title
        ac.result = 0
        ac.presentation_context_definition_results_list = results
        max_len = MaximumLengthNotification()
        max_len.maximum_length_received = self.cfg.max_pdu
        impl = ImplementationClassUIDNotification()
        impl.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION
        ac.user_information = [max_len, impl, version, *ac_roles]
        out = A_ASSOCIATE_AC()
        out.from_primitive(ac)
        self._send(out.encode())
        log.info("association from %s accepted: %d of %d presentation contexts", self.peer.label(),
                 len(self.contexts), len(results))
        rejected = [cx for cx in results if cx.result != 0]
        if rejected:  # one event per association, whatever the number
            kinds = sorted({f"{cx.abstract_syntax} ({_CONTEXT_RESULT.get(cx.result or 0, cx.result)})"
                            for cx in rejected})
            self._audit(audit.APPLICATION_ACTIVITY, audit.Outcome.MINOR_FAILURE,
                        f"{len(rejected)} of {len(results)} presentation contexts rejected: " + "; ".join(kinds[:5])
                        + (f"; and {len(kinds) - 5} more" if len(kinds) > 5 else ""))
        return True

    def _check_peer(self, calling: str, called: str) -> tuple[int, int, int] | None:
        cfg = self.cfg
        if cfg.allowed_peers is not None and not any(r.matches(calling, self.peer.host) for r in cfg.allowed_peers):
            log.warning("rejected association from %s: calling AE/address not in the allow list "
                        "(add it to dimse.allowed_peers to accept it)", self.peer.label())
            self._audit(audit.SECURITY_ALERT, audit.Outcome.SERIOUS_FAILURE, "association rejected: peer not in allow list")
            return RJ_CALLING_AE
        if cfg.check_called_ae and called != cfg.ae_title:
            log.warning("rejected association from %s: called AE %r is not ours (%r); fix the peer's "
                        "configuration or set dimse.check_called_ae: false", self.peer.label(), called, cfg.ae_title)
            self._audit(audit.SECURITY_ALERT, audit.Outcome.MINOR_FAILURE, "association rejected: called AE title unknown")
            return RJ_CALLED_AE
        why = self.admit()
        self.admitted = why is None  # the listener frees the slot when this association ends
        if why is not None:
            log.warning("rejected association from %s (transient, the peer may retry): %s", self.peer.label(), why)
            self._audit(audit.APPLICATION_ACTIVITY, audit.Outcome.MINOR_FAILURE, f"association rejected (transient): {why}")
            return RJ_LOCAL_LIMIT
        return None

    def _serve(self) -> None:
        while True:  # each PDU whole within network_timeout (its wait included), however it trickles in
            self.deadline = time.monotonic() + self.cfg.network_timeout
            pdu_type, body = self._read_pdu(self.cfg.max_pdu)
            if pdu_type == 0x04:
                self._p_data(body)
            elif pdu_type == 0x05:
                self._drop_next_writer()  # tmp/ holds nothing of this association once the peer hears back
                self._send(bytes([0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
                log.info("association from %s released", self.peer.label())
                return
            elif pdu_type == 0x07:
                log.warning("association from %s aborted by the peer", self.peer.label())
                self._audit(audit.APPLICATION_ACTIVITY, audit.Outcome.MINOR_FAILURE, "association aborted by the peer"
                            + (" (a dataset in progress was discarded)" if self.writer is not None else ""))
                return
            elif pdu_type in (0x01, 0x02, 0x03, 0x06):
                raise Abort(AB_UNEXPECTED_PDU, f"unexpected PDU type 0x{pdu_type:02X}")
            else:
                raise Abort(AB_UNRECOGNIZED_PDU, f"unrecognized PDU type 0x{pdu_type:02X}")

    # -- DIMSE messages -------------------------------------------------------------------------
    def _reset_message(self) -> None:
        self.cmd_buf = bytearray()
        self.command: dict[int, int | str] | None = None
        self.msg_context = 0
        self.writer: SpoolWriter | None = None
        self.refusal: StoreResult | None = None
        self.dataset_offset = 0

    def _p_data(self, body: memoryview) -> None:
        pos, end = 0, len(body)
        while pos < end:
            if pos + 6 > end:
                raise Abort(AB_INVALID_PARAMETER, "truncated PDV item")
            length = struct.unpack_from(">I", body, pos)[0]
            if length < 2 or pos + 4 + length > end:
                raise Abort(AB_INVALID_PARAMETER, "PDV item length is inconsistent")
            ctx_id, control = body[pos + 4], body[pos + 5]
            data = body[pos + 6 : pos + 4 + length]
            pos += 4 + length
            if ctx_id not in self.contexts:
                raise Abort(AB_INVALID_PARAMETER, f"PDV on presentation context {ctx_id}, which was not accepted")
            last = bool(control & 0x02)
            if control & 0x01:
                self._command_fragment(ctx_id, data, last)
            else:
                self._dataset_fragment(ctx_id, data, last)

    def _command_fragment(self, ctx_id: int, data: memoryview, last: bool) -> None:
        if self.command is not None:
            raise Abort(AB_UNEXPECTED_PDU, "command fragment while a dataset was expected")
        self.cmd_buf += data
        self.msg_context = ctx_id
        if not last:
            return
        try:
            self.command = cmd = dimse.parse_command(bytes(self.cmd_buf))
        except dimse.BadCommand as exc:
            raise Abort(AB_INVALID_PARAMETER, str(exc)) from exc
        field = cmd.get(dimse.COMMAND_FIELD)
        if field == dimse.C_ECHO_RQ:
            self._respond(dimse.response(dimse.C_ECHO_RSP, int(cmd.get(dimse.MESSAGE_ID, 0)), Verification, 0))
            self._reset_message()
        elif field == dimse.C_STORE_RQ:
            if cmd.get(dimse.DATASET_TYPE) == dimse.NO_DATASET:
                raise Abort(AB_INVALID_PARAMETER, "C-STORE-RQ without a dataset")
            self._begin_store(ctx_id, cmd)
        else:
            raise Abort(AB_UNEXPECTED_PDU, f"unsupported DIMSE command 0x{field if isinstance(field, int) else 0:04X}")

    def _begin_store(self, ctx_id: int, cmd: dict[int, int | str]) -> None:
        context = self.contexts[ctx_id]
        sop_class, sop_instance = str(cmd.get(dimse.AFFECTED_SOP_CLASS, "")), str(cmd.get(dimse.AFFECTED_SOP_INSTANCE, ""))
        if sop_class != context.abstract_syntax:
            self.refusal = StoreResult.refused(st.SOP_CLASS_NOT_SUPPORTED,
                                  "SOP class differs from the presentation context's abstract syntax",
                                  sop_class_uid=sop_class, sop_instance_uid=sop_instance)
        elif self.store.below_floor():
            self.refusal = StoreResult.refused(st.OUT_OF_RESOURCES, "disk below the free-space floor", sop_class_uid=sop_class, sop_instance_uid=sop_instance)
        else:
            meta = file_meta(sop_class, sop_instance, context.transfer_syntax)
            try:  # a full disk (ENOSPC) or any write error: refused with 0xA700 once the dataset is in
                self.writer = self._open_writer()
                self._prepare_writer()
                self.writer.write(meta)
            except OSError as exc:
                if self.writer is not None:
                    self.writer.abort()
                    self.writer = None
                self.refusal = StoreResult.refused(st.OUT_OF_RESOURCES, f"write failed: {exc.strerror}",
                                                   sop_class_uid=sop_class, sop_instance_uid=sop_instance)
            self.dataset_offset = len(meta)

    def _prepare_writer(self) -> None:
        """Create the next dataset's temp file on a helper thread while this one arrives: creating a file costs
        0.1-0.5 ms of kernel time here, which then no longer delays the next C-STORE (an association ending
        removes the one it did not need)."""
        if self._next_writer is None:
            self._next_writer = spool.helpers().submit(self.store.open_writer, self.peer)

    def _open_writer(self) -> "SpoolWriter":
        """The temp file `_prepare_writer` made, else a new one (also when making it failed: the error, e.g.
        ENOSPC, is then raised by this attempt, as without it).

        Raises:
            OSError: the temp file cannot be created.
        """
        prepared, self._next_writer = self._next_writer, None
        if prepared is not None:
            try:
                return prepared.result()
            except OSError:
                pass
        return self.store.open_writer(self.peer)

    def _drop_next_writer(self) -> None:
        prepared, self._next_writer = self._next_writer, None
        if prepared is not None:
            try:
                prepared.result().abort()
            except Exception:  # it could not be made (or removed): the start-up recovery clears tmp/
                log.debug("could not remove a prepared temp file", exc_info=True)

    def _dataset_fragment(self, ctx_id: int, data: memoryview, last: bool) -> None:
        if self.command is None or ctx_id != self.msg_context:
            raise Abort(AB_UNEXPECTED_PDU, "dataset fragment without its command")
        if self.writer is not None:
            try:
                self.writer.write(data)
            except OSError as exc:
                self.writer.abort()
                self.writer = None
                cmd = self.command
                self.refusal = StoreResult.refused(st.OUT_OF_RESOURCES, f"write failed: {exc.strerror}",
                                      sop_class_uid=str(cmd.get(dimse.AFFECTED_SOP_CLASS, "")), sop_instance_uid=str(cmd.get(dimse.AFFECTED_SOP_INSTANCE, "")))
        if last:
            self._finish_store()

    def _finish_store(self) -> None:
        cmd = self.command or {}
        message_id = int(cmd.get(dimse.MESSAGE_ID, 0))
        sop_class, sop_instance = str(cmd.get(dimse.AFFECTED_SOP_CLASS, "")), str(cmd.get(dimse.AFFECTED_SOP_INSTANCE, ""))
        result = self.refusal
        if result is not None:
            result = self.store.refuse(self.peer, result, tally=self.tally)
        else:
            writer, self.writer = self.writer, None
            assert writer is not None
            rec = Received(tmp_path=writer.path, size=writer.size,
                           transfer_syntax_uid=self.contexts[self.msg_context].transfer_syntax,
                           dataset_offset=self.dataset_offset)
            result = self.store.receive(writer, rec, self.peer, sop_class, sop_instance, tally=self.tally)
        self._respond(dimse.response(dimse.C_STORE_RSP, message_id, sop_class, result.status,
                                     sop_instance, result.comment))
        self._reset_message()

    def _respond(self, command: bytes) -> None:
        """Send a command set, in fragments if the peer's maximum PDU length asks for it."""
        room = self.peer_max_pdu - 6 if self.peer_max_pdu else len(command)
        room = max(room, 2)
        for start in range(0, len(command), room):
            chunk = command[start : start + room]
            control = 0x03 if start + room >= len(command) else 0x01
            item = struct.pack(">IBB", len(chunk) + 2, self.msg_context, control) + chunk
            self._send(struct.pack(">BBI", 0x04, 0, len(item)) + item)
