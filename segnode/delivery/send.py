"""Results to a destination - C-STORE (pynetdicom) or STOW-RS (httpx) - and the confirmation that
every instance arrived, asked of the PACS itself (Orthanc's REST API through orthanc-api-client)."""

from __future__ import annotations

import logging
import ssl
import uuid
from pathlib import Path
from typing import Sequence

import httpx
from pydicom import dcmread
from pynetdicom import AE

from segnode.errors import TransientError
from segnode.config import Destination
from segnode.delivery.dimse_client import configure_pynetdicom
from segnode.dicom.uids import uid_name
from segnode.flow import DeliveryReceipt

log = logging.getLogger(__name__)


class DeliveryError(TransientError, RuntimeError):
    """The destination refused or could not be reached; the message says which and what it answered.

    Retryable unless the answer says that sending the same again cannot succeed (a C-STORE failure
    other than out of resources, an HTTP 4xx other than 408/429): `retryable=False` then."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def _http_retryable(status: int) -> bool:
    return status >= 500 or status in (408, 429)


def _tls_context(dest: Destination) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(dest.tls.ca_file) if dest.tls.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if dest.tls.cert_file and dest.tls.key_file:
        ctx.load_cert_chain(str(dest.tls.cert_file), str(dest.tls.key_file))
    return ctx


def send_dimse(dest: Destination, files: Sequence[Path], calling_ae: str) -> dict[str, str]:
    """C-STORE the files over one association (TLS when the destination asks for it), released at
    the end whatever happened.

    Args:
        dest: A "dimse" destination (AE title, host, port).
        files: Part 10 files; each is offered in its own transfer syntax.
        calling_ae: Our AE title, as the destination knows us.

    Returns:
        {SOP Instance UID: "C-STORE status 0xNNNN"}; success or a warning (0xB000, 0xB006, 0xB007).

    Raises:
        DeliveryError: the association is not established, an answer is missing (association
            lost) or a status is a failure; the instances before it were sent.
    """
    datasets = [dcmread(f) for f in files]
    configure_pynetdicom()  # no identifiers in logs, TCP_NODELAY (idempotent)
    ae = AE(ae_title=calling_ae)
    # one presentation context per SOP class and transfer syntax, however many files share them (a CT series'
    # contour images are hundreds of files of one kind; an association allows 128 contexts)
    pairs = list(dict.fromkeys((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets))
    if len(pairs) > 128:
        raise DeliveryError(f"{len(pairs)} kinds of instance (SOP class and transfer syntax) in one delivery; "
                            f"an association carries at most 128", retryable=False)
    for sop_class, syntax in pairs:
        ae.add_requested_context(sop_class, syntax)
    if not (dest.host and dest.port and dest.ae_title):  # Destination validates this; a guard for callers
        raise DeliveryError("a dimse destination needs ae_title, host and port", retryable=False)
    tls = (_tls_context(dest), dest.host) if dest.tls.enabled else None
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)
    if not assoc.is_established:
        raise DeliveryError(f"{dest.ae_title}@{dest.host}:{dest.port} did not accept an association "
                            f"(rejected, aborted or unreachable); check its AE title, address and that it knows us "
                            f"as {calling_ae}")
    answers: dict[str, str] = {}
    try:
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        refused = [pair for pair in pairs if pair not in accepted]
        if refused:  # sending the same again cannot succeed: the PACS does not take these kinds at all
            kinds = ", ".join(f"{uid_name(sop)} in {uid_name(ts)}" for sop, ts in refused)
            raise DeliveryError(f"{dest.ae_title} does not accept {kinds} (presentation context rejected); nothing "
                                f"was sent. Configure the PACS to store it, or have segnode write what it accepts "
                                f"(outputs.seg_type: BINARY for a PACS without Label Map Segmentation)",
                                retryable=False)
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(getattr(status, "Status", -1)) if status else -1
            if code == -1:
                raise DeliveryError(f"{dest.ae_title} did not answer the C-STORE of {ds.SOPInstanceUID} "
                                    f"(association lost)")
            if code not in (0x0000, 0xB000, 0xB007, 0xB006):  # success, or stored with a warning
                raise DeliveryError(f"{dest.ae_title} refused {ds.SOPInstanceUID}: status 0x{code:04X}",
                                    retryable=code & 0xFF00 == 0xA700)  # out of resources may pass later
            answers[ds.SOPInstanceUID] = f"C-STORE status 0x{code:04X}"
    finally:
        assoc.release()
    return answers


def _auth(dest: Destination) -> tuple[dict[str, str], httpx.BasicAuth | None]:
    if dest.token is not None:
        return {"Authorization": f"Bearer {dest.token.get_secret_value()}"}, None
    if dest.username and dest.password is not None:
        return {}, httpx.BasicAuth(dest.username, dest.password.get_secret_value())
    return {}, None


def send_stow(dest: Destination, files: Sequence[Path]) -> dict[str, str]:
    """STOW-RS the files in one multipart request to {url}/studies (bearer or basic auth when set).

    Args:
        dest: A "dicomweb" destination (url, credentials, timeout in s, CA file).
        files: Part 10 files.

    Returns:
        {SOP Instance UID: "STOW-RS HTTP 200" or "... 202"}.

    Raises:
        DeliveryError: the request fails (connection, TLS, timeout), the answer is not HTTP 200 or
            202, or the response lists instances in its Failed SOP Sequence.
    """
    boundary = uuid.uuid4().hex
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes()
                    + b"\r\n" for f in files) + b"--" + boundary.encode() + b"--\r\n"
    headers, auth = _auth(dest)
    headers.update({"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                    "Accept": "application/dicom+json"})
    url = f"{(dest.url or '').rstrip('/')}/studies"
    verify: bool | str = str(dest.tls.ca_file) if dest.tls.ca_file else True
    try:
        rsp = httpx.post(url, content=body, headers=headers, auth=auth, timeout=dest.timeout, verify=verify)
    except httpx.HTTPError as exc:
        raise DeliveryError(f"STOW-RS to {url} failed: {type(exc).__name__}: {exc}") from exc
    if rsp.status_code not in (200, 202):
        raise DeliveryError(f"STOW-RS to {url} answered HTTP {rsp.status_code}: {rsp.text[:300]}",
                            retryable=_http_retryable(rsp.status_code))
    failed = _stow_failures(rsp)
    if failed:
        raise DeliveryError(f"STOW-RS to {url}: the server refused {', '.join(failed)}")
    return {dcmread(f, stop_before_pixels=True).SOPInstanceUID: f"STOW-RS HTTP {rsp.status_code}" for f in files}


def _stow_failures(rsp: httpx.Response) -> list[str]:
    """SOP Instance UIDs listed in the response's Failed SOP Sequence (00081198)."""
    try:
        body = rsp.json()
    except ValueError:
        return []
    failed = (body.get("00081198") or {}).get("Value", []) if isinstance(body, dict) else []
    return [str(item.get("00081155", {}).get("Value", ["?"])[0]) for item in failed]


def confirm(dest: Destination, uids: Sequence[str]) -> str:
    """Ask the PACS whether every instance is there: Orthanc's REST API when `orthanc_url` is set,
    else QIDO-RS on a DICOMweb destination; a DIMSE destination without either counts its C-STORE
    success statuses, and says so. A sender's success is not proof of storage, hence the question.

    Args:
        dest: The destination the instances went to.
        uids: Their SOP Instance UIDs.

    Returns:
        How arrival was confirmed, for the audit trail.

    Raises:
        DeliveryError: the PACS does not have (Orthanc) or does not find (QIDO-RS) an instance.
        httpx.HTTPError: a QIDO-RS request fails outright (connection, timeout); errors of the
            Orthanc client propagate as it raises them.
    """
    if dest.orthanc_url:
        from orthanc_api_client import OrthancApiClient

        api = OrthancApiClient(dest.orthanc_url, user=dest.username,
                               pwd=dest.password.get_secret_value() if dest.password else None)
        missing = [uid for uid in uids if not api.lookup(uid, filter="Instance")]
        if missing:
            raise DeliveryError(f"Orthanc at {dest.orthanc_url} does not have {', '.join(missing)} after delivery")
        return f"confirmed by Orthanc REST at {dest.orthanc_url}: {len(uids)} instance(s) present"
    if dest.kind == "dicomweb":
        headers, auth = _auth(dest)
        missing = []
        for uid in uids:
            rsp = httpx.get(f"{(dest.url or '').rstrip('/')}/instances", params={"SOPInstanceUID": uid},
                            headers={**headers, "Accept": "application/dicom+json"}, auth=auth, timeout=dest.timeout)
            if rsp.status_code != 200 or not rsp.content or not rsp.json():
                missing.append(uid)
        if missing:
            raise DeliveryError(f"QIDO-RS at {dest.url} does not find {', '.join(missing)} after delivery")
        return f"confirmed by QIDO-RS at {dest.url}: {len(uids)} instance(s) found"
    return "not confirmed beyond the C-STORE success statuses (set orthanc_url to have the PACS asked)"


def deliver(dest: Destination, files: Sequence[Path], calling_ae: str) -> DeliveryReceipt:
    """Send the files (C-STORE or STOW-RS, by the destination's kind), then confirm their arrival.

    Args:
        dest: Where to.
        files: Part 10 files.
        calling_ae: Our AE title for C-STORE.

    Returns:
        The destination's answers and how arrival was confirmed.

    Raises:
        DeliveryError: sending failed or an instance is not confirmed (see send_dimse, send_stow, confirm);
            retryable, as the PACS may come back.
    """
    answers = send_dimse(dest, files, calling_ae) if dest.kind == "dimse" else send_stow(dest, files)
    return DeliveryReceipt(answers=answers, confirmed=confirm(dest, list(answers)))
