"""The operators' dashboard: one static page (segnode/web/static, no CDN) over the routes here.

Studies -> series (completion state) -> jobs -> deliveries, refreshed every few seconds; a study's lineage
(`segnode audit trace`); a series' rule explanation; the dead letter with retry; the audit chain's state;
a link to the viewer per study when `http.viewer_url` is set. Behind the token like the rest of the API:
a browser signs in once (POST /api/session sets an HttpOnly, SameSite=Strict cookie holding a signed expiry,
segnode.web.session), and requests that change something must also carry the header X-Segnode-Request (a
page of another site cannot add it; checked by the app's `authorize` for every method but GET and HEAD).
"""

from __future__ import annotations

import json
import threading
import time
from importlib import resources
from typing import Any, Callable

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy import distinct, func, select

from segnode.audit.ledger import Ledger
from segnode.config import Settings
from segnode.db.models import DECISIONS, INSTANCES, JOBS, SERIES
from segnode.db.queries import completed_series, list_studies
from segnode.dicom.uids import is_valid_uid
from segnode.web.session import MAX_SIGN_IN_BYTES, SESSION_SECONDS, session_value, token_field

STUDIES_SHOWN = 50
DEAD_SHOWN = 100
SCAN_ROWS = 100_000
OVERVIEW_TTL = 1.0  # s: any number of open dashboards cost the database one overview per this
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}


def _asset(name: str) -> bytes:
    return resources.files("segnode.web").joinpath("static", name).read_bytes()


def recent_studies(conn: Any, limit: int, scan: int = SCAN_ROWS) -> list[str]:
    """Up to `limit` Study Instance UIDs, the most recently received first, read backwards along the index on
    `received_at` and at most `scan` index rows deep (a study of a million instances is not read whole to
    find the next one: then fewer studies come back)."""
    found: dict[str, None] = {}
    rows = conn.execute(select(INSTANCES.c.study_uid).order_by(INSTANCES.c.received_at.desc()).limit(scan))
    for (study_uid,) in rows:
        found.setdefault(study_uid, None)
        if len(found) >= limit:
            break
    rows.close()
    return list(found)


def overview(conn: Any, limit: int = STUDIES_SHOWN) -> dict[str, Any]:
    """The `limit` most recent studies with their series (completion state) and each series' jobs, and the
    newest DEAD_SHOWN dead jobs, with the totals of both (`studies_total`, `dead_total`). Bounded: what it
    reads does not grow with the number of instances the node holds, only with the studies shown."""
    from segnode.jobs.queue import Job

    uids = recent_studies(conn, limit)
    studies = list_studies(conn, uids)
    states = {r.series_uid: (r.state, r.generation) for r in conn.execute(
        select(SERIES.c.series_uid, SERIES.c.state, SERIES.c.generation).where(SERIES.c.study_uid.in_(uids)))}
    by_series: dict[str, list[dict[str, Any]]] = {}
    for row in conn.execute(select(JOBS).where(JOBS.c.study_uid.in_(uids)).order_by(JOBS.c.id)).mappings():
        job = Job.from_row(dict(row)).as_dict()
        by_series.setdefault(job["series_uid"], []).append(job)
    order = {uid: i for i, uid in enumerate(uids)}
    studies.sort(key=lambda study: order[study["study_uid"]])
    for study in studies:
        for series in study["series"]:
            state, generation = states.get(series["series_uid"], ("receiving", 0))
            series.update(state=state, generation=generation, jobs=by_series.get(series["series_uid"], []))
    dead = [Job.from_row(dict(r)).as_dict() for r in conn.execute(
        select(JOBS).where(JOBS.c.state == "dead").order_by(JOBS.c.id.desc()).limit(DEAD_SHOWN)).mappings()]
    return {"studies": studies, "dead": dead,
            "studies_total": conn.execute(select(func.count(distinct(SERIES.c.study_uid)))).scalar() or len(studies),
            "dead_total": conn.execute(select(func.count()).where(JOBS.c.state == "dead")).scalar() or 0}


def dashboard_routes(settings: Settings, ledger: Ledger, authorize: Callable[..., str]) -> APIRouter:
    """The dashboard's page, assets and the API routes only it needs (see the module's docstring).

    Args:
        settings: the node's settings (`http.viewer_url`, the rules for explanations).
        ledger: the database and audit trail.
        authorize: the app's token check: `authorize(request)` (or `authorize(request, token)` to check a
            token given otherwise), raising 401.
    """
    router = APIRouter()

    @router.get("/dashboard", include_in_schema=False)
    def page() -> HTMLResponse:
        """The page itself is public (it holds no data); everything it shows comes through the API."""
        return HTMLResponse(_asset("dashboard.html"))

    @router.get("/dashboard/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if name not in ASSETS:
            raise HTTPException(404, "no such dashboard file")
        return Response(_asset(name), media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    @router.post("/api/session", status_code=204)
    async def sign_in(request: Request) -> Response:
        """Exchange the token (form or JSON field `token`, at most 4 KiB) for a session cookie: HttpOnly,
        SameSite=Strict, Secure over HTTPS, ending after 12 h; 401 for a wrong token, 413 for a larger body."""
        from segnode.web.app import TOKEN_COOKIE

        if settings.http.token is None:
            return Response(status_code=204)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_SIGN_IN_BYTES:
                raise HTTPException(413, f"a sign-in body holds one token: at most {MAX_SIGN_IN_BYTES} bytes")
        token = token_field(bytes(body), request.headers.get("content-type", ""))
        authorize(request, token)  # 401 (audited) for a wrong one
        response = Response(status_code=204)
        secure = request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
        response.set_cookie(TOKEN_COOKIE, session_value(settings.http.token.get_secret_value()), httponly=True,
                            samesite="strict", path="/", max_age=SESSION_SECONDS, secure=secure)
        return response

    @router.delete("/api/session", status_code=204)
    def sign_out() -> Response:
        """Sign out: the browser drops its session cookie."""
        from segnode.web.app import TOKEN_COOKIE

        response = Response(status_code=204)
        response.delete_cookie(TOKEN_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    cache: dict[str, Any] = {"at": -OVERVIEW_TTL, "data": None}
    cache_lock = threading.Lock()

    @router.get("/api/overview")
    def get_overview(request: Request) -> dict[str, Any]:
        """The 50 most recently received studies -> series (state: receiving, open, complete, refused) -> jobs;
        the newest 100 dead jobs; `studies_total` and `dead_total`; the viewer link template ({study_uid}
        replaced by the page). Computed at most once a second whatever the number of dashboards open."""
        authorize(request)
        with cache_lock:
            if time.monotonic() - cache["at"] >= OVERVIEW_TTL:
                with ledger.engine.connect() as conn:
                    cache["data"] = overview(conn)
                cache["at"] = time.monotonic()
            out = dict(cache["data"])
        out.update(viewer_url=settings.http.viewer_url, token_required=settings.http.token is not None)
        return out

    @router.get("/api/studies/{study}/trace")
    def study_trace(request: Request, study: str) -> dict[str, Any]:
        """The study's lineage, as `segnode audit trace --json` prints it; 404 when nothing is known."""
        from segnode.lineage import render, trace

        authorize(request)
        if not is_valid_uid(study):
            raise HTTPException(400, "the study in the URL is not a valid UID")
        with ledger.engine.connect() as conn:
            story = trace(conn, settings.data, study)
        if not story["series"] and not story["jobs"]:
            raise HTTPException(404, "nothing is known about this study")
        return {"story": json.loads(json.dumps(story, default=str)), "lines": render(story)}

    @router.get("/api/series/{series}/explain")
    def explain(request: Request, series: str) -> dict[str, Any]:
        """The rules as loaded now, evaluated on the series' latest version, condition by condition (as
        `segnode rules explain`), with the rule set that decided it when it was routed."""
        from segnode.pipeline import ruleset
        from segnode.routing.router import facts
        from segnode.routing.rules import decide

        authorize(request)
        if not is_valid_uid(series):
            raise HTTPException(400, "the series in the URL is not a valid UID")
        with ledger.engine.connect() as conn:
            row = conn.execute(select(SERIES.c.generation).where(SERIES.c.series_uid == series)).first()
            decided = conn.execute(select(DECISIONS.c.ruleset_sha256).where(DECISIONS.c.series_uid == series)
                                   .order_by(DECISIONS.c.id.desc())).scalar()
            found = completed_series(conn, series, row.generation if row else 0)
        if not found.instances:
            raise HTTPException(404, "no instances of this series are indexed")
        rules = ruleset(settings)
        return {"series_uid": series, "ruleset_sha256": rules.sha256, "decided_with_ruleset_sha256": decided,
                "lines": decide(rules, facts(settings.data, found)).explain()}

    @router.get("/api/audit/verify")
    def verify(request: Request) -> dict[str, Any]:
        """The audit chain's state, as `segnode audit verify` reports it."""
        from segnode.audit.trail import verify_connection

        authorize(request)
        with ledger.engine.connect() as conn:
            result = verify_connection(conn, settings.data.audit_head)
        return {"ok": result.ok, "count": result.count, "problems": result.problems, "anchored": result.anchored}

    @router.post("/api/jobs/{job_id}/retry", status_code=202)
    def retry_job(request: Request, job_id: int) -> JSONResponse:
        """Queue a failed or dead job again (audited, as `segnode jobs retry`); 409 when it is neither."""
        from segnode.jobs.queue import retry

        user = authorize(request)
        if not retry(ledger, job_id, who=f"http:{user or 'anonymous'}"):
            raise HTTPException(409, f"job {job_id} is not failed or dead")
        return JSONResponse({"job_id": job_id, "state": "queued"}, status_code=202)

    return router
