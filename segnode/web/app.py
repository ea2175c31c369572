"""FastAPI application: STOW-RS, the REST API, health."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from segnode import __version__
from segnode.audit import events as audit
from segnode.dicom.uids import is_valid_uid
from segnode.db.queries import list_studies
from segnode.audit.ledger import Ledger
from segnode.config import Settings
from segnode.flow import JobKind, JobState
from segnode.health import Operations
from segnode.logs import printable
from segnode.metrics import CONTENT_TYPE, HTTP_REFUSALS, exposition
from segnode.web.dashboard import dashboard_routes
from segnode.web.guard import RefusalAudit
from segnode.web.reference import api_reference
from segnode.web.session import session_valid
from segnode.web.work import work_routes
from segnode.ingest.store import Peer, StoreService
from segnode.web.stow import BadRequest, StowSession, http_status, response_body
from segnode.web.wado import wado_routes

log = logging.getLogger(__name__)
DICOM_JSON = "application/dicom+json"
CHANGE_HEADER = "x-segnode-request"  # the dashboard's requests that change something carry it
TOKEN_COOKIE = "segnode_session"  # set by the dashboard's sign-in (signed expiry: segnode.web.session)


def _boundary(content_type: str) -> str:
    """Check the STOW-RS media type and return its boundary (415 / 400 otherwise)."""
    main, _, rest = content_type.partition(";")
    if main.strip().lower() != "multipart/related":
        raise HTTPException(415, "STOW-RS needs Content-Type: multipart/related; type=\"application/dicom\"")
    params: dict[str, str] = {}
    for item in rest.split(";"):
        key, _, value = item.partition("=")
        if key.strip():
            params[key.strip().lower()] = value.strip().strip('"')
    kind = params.get("type", "application/dicom").lower()
    if kind != "application/dicom":
        raise HTTPException(415, f"multipart/related type {kind!r} is not supported; send application/dicom parts")
    if not params.get("boundary"):
        raise HTTPException(400, "multipart/related without a boundary parameter")
    return params["boundary"]


def _peer(request: Request, protocol: str, user: str = "") -> Peer:
    client = request.client
    return Peer(protocol, client.host if client else "", client.port if client else 0, user=user)


def create_app(settings: Settings, store: StoreService, ledger: Ledger, ops: Operations | None = None) -> FastAPI:
    """The node's HTTP side over its store (STOW-RS) and its ledger (index, queue, audit).

    Every route but the probes (/livez, /healthz, /readyz) needs the token when one is configured
    (`http.token`): `Authorization: Bearer <token>`, or the cookie a browser gets from the dashboard's
    sign-in; 401 otherwise, audited as a security alert. Without a token nothing is checked. The API
    reference (/docs, /openapi.json) is behind the token too, and loads nothing from outside the node.

    Args:
        settings: the node's settings (the bearer token in `http.token`).
        store: where STOW-RS parts are committed, as DIMSE instances are.
        ledger: the database and audit trail, for the API's reads and requests.
        ops: the readiness checks behind /readyz and the node's metrics (/metrics, with every process's).

    Returns:
        The application, for uvicorn (segnode.service.Node runs it in a thread).
    """
    app = FastAPI(title="segnode", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    token = settings.http.token
    ops = ops or Operations()
    health = ops.health

    refusals = RefusalAudit()

    def refusal_note(request: Request, status: int) -> str | None:
        """Count a refusal; None when it is not to be audited (the peer's repeats of one status within a
        minute), else a note of how many went unrecorded before it."""
        HTTP_REFUSALS.labels(str(status)).inc()
        skipped = refusals.admit(f"{request.client.host if request.client else ''} {status}")
        if skipped is None:
            return None
        return f" ({skipped} more refused from this host since the last one recorded)" if skipped else ""

    @app.exception_handler(StarletteHTTPException)
    async def audited_refusal(request: Request, exc: StarletteHTTPException) -> Response:
        """Every refused request is counted and audited, a peer's repeats once a minute with their count
        (401 is audited as a security alert by `authorize`)."""
        note = refusal_note(request, exc.status_code) if exc.status_code >= 400 and exc.status_code != 401 else None
        if note is not None:
            path = printable(request.url.path)
            event = audit.Event(type=audit.APPLICATION_ACTIVITY, action=audit.Action.EXECUTE,
                                outcome=audit.Outcome.MINOR_FAILURE if exc.status_code < 500 else
                                audit.Outcome.SERIOUS_FAILURE, actor=_peer(request, "http").actor(),
                                objects={"http_status": exc.status_code, "method": printable(request.method, 16),
                                         "path": path},
                                detail=f"HTTP {exc.status_code} to {printable(request.method, 16)} {path}: "
                                       f"{printable(str(exc.detail), 300)}{note}")
            try:
                await run_in_threadpool(store.record, event)
            except Exception:  # the caller still gets its answer
                log.exception("could not write the audit event for a refused HTTP request")
        return await http_exception_handler(request, exc)

    def authorize(request: Request, given: str | None = None) -> str:
        if token is None:
            return ""
        secret = token.get_secret_value()
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if given is not None:
            ok = bool(given) and secrets.compare_digest(given.strip().encode("utf-8", "replace"), secret.encode())
        elif scheme.lower() == "bearer":
            ok = bool(value) and secrets.compare_digest(value.strip().encode("utf-8", "replace"), secret.encode())
        else:
            ok = session_valid(request.cookies.get(TOKEN_COOKIE, ""), secret)
            if ok and request.method not in ("GET", "HEAD") and request.headers.get(CHANGE_HEADER) != "1":
                raise HTTPException(403, f"a change made with the sign-in cookie needs the header {CHANGE_HEADER}: 1 "
                                         "(a page of another site cannot add it)")
        if not ok:
            note = refusal_note(request, 401)
            if note is not None:
                store.record_security(_peer(request, "http"), f"{printable(request.method, 16)} "
                                      f"{printable(request.url.path)}: missing or wrong bearer token{note}")
            raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        return "bearer"

    @app.get("/livez")
    @app.get("/healthz")
    def live() -> dict[str, Any]:
        """Liveness, without authentication: the process answers ({"status": "ok", "version": ...}). Whether
        it can take work is /readyz."""
        return {"status": "ok", "version": __version__}

    @app.get("/readyz")
    def ready() -> JSONResponse:
        """Readiness, without authentication: 200 {"status": "ready", "checks": [...]} when every check
        passes; 503 {"status": "not ready", "failing": {check: reason}} when the disk is under the
        watermark, the database does not answer, the DIMSE listener is not accepting or (under `serve`)
        no worker runs."""
        failing = health.failing()
        if failing:
            return JSONResponse({"status": "not ready", "failing": failing, "version": __version__}, status_code=503)
        return JSONResponse({"status": "ready", "checks": health.names, "version": __version__})

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        """Prometheus text exposition (behind the token when one is set: give Prometheus `authorization:
        {credentials_file: <file holding the token>}`): instances and bytes received, stage latencies, jobs by
        state and kind, the dead letter, associations, free disk, model load time, GPU memory, HTTP refusals.
        See segnode.metrics."""
        authorize(request)
        return Response(exposition(ops.metrics), media_type=CONTENT_TYPE)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        """The API reference as one page rendered here from the OpenAPI schema (no script, no CDN)."""
        authorize(request)
        return HTMLResponse(api_reference(app.openapi()))

    @app.get("/api/studies")
    def studies(request: Request) -> list[dict[str, Any]]:
        """Indexed studies with their series (modality, instance count); see db.queries.list_studies."""
        authorize(request)
        with ledger.engine.connect() as conn:
            return list_studies(conn)

    @app.post("/api/studies/{study}/complete", status_code=202)
    def complete(request: Request, study: str) -> dict[str, Any]:
        """Complete (and route) the study's open series at the next completion poll.

        202 with {"study_uid", "series": how many were marked}; 400 when `study` is not a valid UID;
        404 when the study has no open series (unknown, or every series already completed).
        """
        from segnode.completion import request_completion

        authorize(request)
        if not is_valid_uid(study):
            raise HTTPException(400, "the study in the URL is not a valid UID")
        count = request_completion(ledger, study, "http")
        if not count:
            raise HTTPException(404, "no open series in this study (unknown, or already completed)")
        return {"study_uid": study, "series": count}

    @app.get("/api/jobs")
    def jobs(request: Request, state: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """Jobs oldest first (rows as `Job.as_dict`: `kind` segment or deliver, `destination` of a delivery),
        optionally of one state (?state=dead) and kind (?kind=deliver); 400 naming the values for any other."""
        from segnode.jobs.queue import list_jobs

        authorize(request)
        for name, value, allowed in (("state", state, [s.value for s in JobState]),
                                     ("kind", kind, [k.value for k in JobKind])):
            if value is not None and value not in allowed:
                raise HTTPException(400, f"unknown {name} {value[:40]!r}; one of {', '.join(allowed)}")
        with ledger.engine.connect() as conn:
            return [job.as_dict() for job in list_jobs(conn, state=state, kind=kind)]

    app.include_router(dashboard_routes(settings, ledger, authorize))
    app.include_router(wado_routes(settings, ledger, authorize))
    app.include_router(work_routes(settings, ledger, authorize))

    async def stow(request: Request, study: str | None) -> JSONResponse:
        """STOW-RS: store every application/dicom part, answering the Store Instances Response (DICOM
        JSON) with 200 (all stored), 202 (some refused), 409 (none stored) or 503 + Retry-After: 60 s
        (none stored, disk full); see stow.http_status.

        Parts are committed as they end, on a worker thread; with `study`, a part of another study is
        refused (0xA900). 415: not multipart/related of application/dicom; 400: no boundary, a study
        that is not a valid UID, a malformed body or no parts. A 400 for a malformed body comes after
        the parts that ended before the fault were committed: they stay stored, though the answer does
        not list them.
        """
        user = await run_in_threadpool(authorize, request)  # a refusal writes an audit event
        if study is not None and not is_valid_uid(study):
            raise HTTPException(400, "the study in the URL is not a valid UID")
        boundary = _boundary(request.headers.get("content-type", ""))
        session = StowSession(store, boundary, _peer(request, "stow", user), study)
        try:
            async for chunk in request.stream():
                session.feed(chunk)
                if session.finished:
                    await run_in_threadpool(session.store_finished)
            session.close()
        except BadRequest as exc:
            await run_in_threadpool(session.store_finished)
            raise HTTPException(400, str(exc)) from exc
        except ClientDisconnect:  # audited like a peer's abort (by the refusal handler), not a traceback
            raise HTTPException(400, "the client closed the connection before its request body ended; the "
                                     "parts that had ended were stored, the one in progress dropped") from None
        finally:  # a client that went away (or any error) leaves no temp file or descriptor behind
            session.discard()
            await run_in_threadpool(session.summarize)
        await run_in_threadpool(session.store_finished)
        if not session.results:
            raise HTTPException(400, "the request holds no parts")
        code = http_status(session.results)
        headers = {"Retry-After": "60"} if code == 503 else None
        return JSONResponse(response_body(session.results), status_code=code, media_type=DICOM_JSON, headers=headers)

    @app.post("/dicom-web/studies")
    async def stow_any(request: Request) -> JSONResponse:
        return await stow(request, None)

    @app.post("/dicom-web/studies/{study}")
    async def stow_study(request: Request, study: str) -> JSONResponse:
        return await stow(request, study)

    return app
