"""The operators' dashboard: one static page (segnode/web/static, no CDN) over the routes here.

Studies -> series (completion state) -> jobs -> deliveries, refreshed every few seconds; a study's lineage
(`segnode audit trace`); a series' rule explanation; the dead letter with retry; the audit chain's state;
a link to the viewer per study when `http.viewer_url` is set. Behind the token like the rest of the API:
a browser signs in once (POST /api/session sets an HttpOnly, SameSite=Strict cookie), and requests that
change something must also carry the header X-Segnode-Request (a page of another site cannot add it).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Callable

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy import select

from segnode.audit.ledger import Ledger
from segnode.config import Settings
from segnode.db.models import DECISIONS, SERIES
from segnode.db.queries import completed_series, list_studies
from segnode.dicom.uids import is_valid_uid

ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
CHANGE_HEADER = "x-segnode-request"


def _asset(name: str) -> bytes:
    return resources.files("segnode.web").joinpath("static", name).read_bytes()


def overview(conn: Any) -> dict[str, Any]:
    """Studies with their series (completion state) and each series' jobs, and the dead letter."""
    from segnode.jobs.queue import list_jobs

    states = {r.series_uid: (r.state, r.generation) for r in conn.execute(
        select(SERIES.c.series_uid, SERIES.c.state, SERIES.c.generation))}
    jobs = [j.as_dict() for j in list_jobs(conn)]
    by_series: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        by_series.setdefault(job["series_uid"], []).append(job)
    studies = list_studies(conn)
    for study in studies:
        for series in study["series"]:
            state, generation = states.get(series["series_uid"], ("receiving", 0))
            series.update(state=state, generation=generation, jobs=by_series.get(series["series_uid"], []))
    return {"studies": studies, "dead": [j for j in jobs if j["state"] == "dead"]}


def dashboard_routes(settings: Settings, ledger: Ledger, authorize: Callable[..., str]) -> APIRouter:
    """The dashboard's page, assets and the API routes only it needs (see the module's docstring).

    Args:
        settings: the node's settings (`http.viewer_url`, the rules for explanations).
        ledger: the database and audit trail.
        authorize: the app's token check: `authorize(request)` (or `authorize(request, token)` to check a
            token given otherwise), raising 401.
    """
    router = APIRouter()

    def change(request: Request) -> str:
        user = authorize(request)
        if request.headers.get("authorization", "").lower().startswith("bearer "):
            return user
        if settings.http.token is not None and request.headers.get(CHANGE_HEADER) != "1":
            raise HTTPException(403, f"a change made with the sign-in cookie needs the header {CHANGE_HEADER}: 1")
        return user

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
        """Exchange the token for a cookie (form or JSON field `token`); 401 for a wrong one."""
        from segnode.web.app import TOKEN_COOKIE

        if settings.http.token is None:
            return Response(status_code=204)
        body = await request.body()
        try:
            token = str(json.loads(body or b"{}").get("token", ""))
        except (ValueError, AttributeError):
            token = ""
        authorize(request, token)  # 401 (audited) for a wrong one
        response = Response(status_code=204)
        response.set_cookie(TOKEN_COOKIE, str(token), httponly=True, samesite="strict", path="/")
        return response

    @router.get("/api/overview")
    def get_overview(request: Request) -> dict[str, Any]:
        """Studies -> series (state: receiving, open, complete, refused) -> jobs; the dead letter; the viewer
        link template ({study_uid} replaced by the page)."""
        authorize(request)
        with ledger.engine.connect() as conn:
            out = overview(conn)
        out["viewer_url"] = settings.http.viewer_url
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

        user = change(request)
        if not retry(ledger, job_id, who=f"http:{user or 'anonymous'}"):
            raise HTTPException(409, f"job {job_id} is not failed or dead")
        return JSONResponse({"job_id": job_id, "state": "queued"}, status_code=202)

    return router
