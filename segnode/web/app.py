"""FastAPI application: STOW-RS, the REST API, health."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from segnode import __version__
from segnode.audit import events as audit
from segnode.dicom.uids import is_valid_uid
from segnode.db.queries import list_studies
from segnode.audit.ledger import Ledger
from segnode.config import Settings
from segnode.ingest.store import Peer, StoreService
from segnode.web.stow import BadRequest, StowSession, http_status, response_body

log = logging.getLogger(__name__)
DICOM_JSON = "application/dicom+json"


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


def create_app(settings: Settings, store: StoreService, ledger: Ledger) -> FastAPI:
    """The node's HTTP side over its store (STOW-RS) and its ledger (index, queue, audit).

    The /api and /dicom-web routes need `Authorization: Bearer <http.token>` when a token is configured:
    401 otherwise, audited as a security alert. Without a token nothing is checked. /healthz and
    FastAPI's /docs and /openapi.json are open.

    Args:
        settings: the node's settings (the bearer token in `http.token`).
        store: where STOW-RS parts are committed, as DIMSE instances are.
        ledger: the database and audit trail, for the API's reads and requests.

    Returns:
        The application, for uvicorn (segnode.service.Node runs it in a thread).
    """
    app = FastAPI(title="segnode", version=__version__)
    token = settings.http.token

    @app.exception_handler(StarletteHTTPException)
    async def audited_refusal(request: Request, exc: StarletteHTTPException) -> Response:
        """Every refused request is audited once (401 already is, as a security alert, by `authorize`)."""
        if exc.status_code >= 400 and exc.status_code != 401:
            event = audit.Event(type=audit.APPLICATION_ACTIVITY, action=audit.Action.EXECUTE,
                                outcome=audit.Outcome.MINOR_FAILURE if exc.status_code < 500 else
                                audit.Outcome.SERIOUS_FAILURE, actor=_peer(request, "http").actor(),
                                objects={"http_status": exc.status_code, "method": request.method,
                                         "path": request.url.path[:200]},
                                detail=f"HTTP {exc.status_code} to {request.method} {request.url.path[:200]}: "
                                       f"{str(exc.detail)[:300]}")
            try:
                await run_in_threadpool(store.record, event)
            except Exception:  # the caller still gets its answer
                log.exception("could not write the audit event for a refused HTTP request")
        return await http_exception_handler(request, exc)

    def authorize(request: Request) -> str:
        if token is None:
            return ""
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip(), token.get_secret_value()):
            store.record_security(_peer(request, "http"),
                                       f"{request.method} {request.url.path}: missing or wrong bearer token")
            raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        return "bearer"

    @app.get("/healthz")
    def health() -> dict[str, Any]:
        """Liveness, without authentication: {"status": "ok", "version": ...}."""
        return {"status": "ok", "version": __version__}

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
    def jobs(request: Request, state: str | None = None) -> list[dict[str, Any]]:
        """Jobs oldest first (rows as `Job.as_dict`), optionally of one state (?state=dead); an unknown
        state matches nothing (200, [])."""
        from segnode.jobs.queue import list_jobs

        authorize(request)
        with ledger.engine.connect() as conn:
            return [job.as_dict() for job in list_jobs(conn, state=state)]

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
