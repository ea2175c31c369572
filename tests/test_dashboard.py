"""The operators' dashboard in Debian's chromium (Playwright), as an operator uses it: sign in with the token,
watch a study arrive and its job succeed, read its lineage and its rules, retry a dead job. Nothing is
loaded from outside the node."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from ohif import CHROMIUM, CHROMIUM_ARGS
from segnode import pipeline
from segnode.audit.ledger import Ledger
from segnode.flow import JobKind, JobSpec
from segnode.jobs import queue
from segnode.jobs.worker import Worker
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom
from tests.conftest import storescu

pytestmark = pytest.mark.browser
VIEWER = "http://viewer.invalid/ohif/viewer?StudyInstanceUIDs={study_uid}"


def test_an_operator_watches_a_study_through_and_retries_a_dead_job(start_node, tmp_path: Path):
    playwright = pytest.importorskip("playwright.sync_api")
    node = start_node(http={"token": "s3cret", "viewer_url": VIEWER}, routing={"stable_seconds": 0.3})
    base = f"http://127.0.0.1:{node.http_port}"
    ledger = Ledger(node.engine, node.trail)
    completion, worker = pipeline.completion(node.settings, ledger), Worker(ledger, node.settings)
    files = write_phantom(generate_ct(3, CTOptions(matrix=16, slice_spacing=5.0, z_extent_mm=60.0)), tmp_path / "ct")
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            outside: list[str] = []
            errors: list[str] = []
            page.on("request", lambda r: None if r.url.startswith(base) else outside.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{base}/dashboard")

            page.wait_for_selector("#signin", state="visible")
            page.fill("#token", "wrong")
            page.click("#signin button")
            page.wait_for_selector("text=wrong token")
            page.fill("#token", "s3cret")
            page.click("#signin button")
            page.wait_for_selector("text=No study received yet.")
            page.wait_for_selector("#audit.audit-ok")

            assert storescu(node.dimse.port, files).returncode == 0
            study = page.wait_for_selector("[data-study]", timeout=10_000).get_attribute("data-study")
            row = page.locator(f"[data-study='{study}'] [data-series]")
            assert row.locator("td").nth(2).inner_text() == str(len(files))
            time.sleep(0.4)
            completion.poll()  # the study was quiet: completed and routed, its job queued
            page.wait_for_selector(f"[data-study='{study}'] [data-state=queued]")
            assert worker.run_once()
            page.wait_for_selector(f"[data-study='{study}'] [data-state=succeeded]")
            assert "complete" in row.locator("td").nth(3).inner_text()
            link = page.locator(f"[data-study='{study}'] a")
            assert link.get_attribute("href") == VIEWER.replace("{study_uid}", study)

            page.click(f"[data-study='{study}'] button:has-text('Lineage')")
            page.wait_for_selector(f"#detail-body:has-text('study {study}')")
            assert "ct-abdomen-phantom-3d" in page.inner_text("#detail-body")
            page.click(f"[data-study='{study}'] button:has-text('Rules')")
            page.wait_for_selector("#detail-body:has-text('decision: run ct-abdomen-phantom-3d')")

            (segment,) = httpx.get(f"{base}/api/jobs", headers={"Authorization": "Bearer s3cret"}).json()
            with ledger.transaction() as (conn, append):  # its results sent where no destination is configured
                spec = JobSpec(kind=JobKind.DELIVER, series_uid=segment["series_uid"], study_uid=study, generation=1,
                               model=segment["model"], model_version=segment["model_version"],
                               weights_sha256=segment["weights_sha256"], input_sha256=segment["input_sha256"],
                               instances=len(files), rule="r", ruleset_sha256=segment["ruleset_sha256"],
                               destination="gone", parent_job=segment["id"], parent_key=segment["idempotency_key"])
                dead_id, _ = queue.enqueue(conn, append, spec, 3)
            assert worker.run_once()  # not configured: dead at once, no retry can help until it is
            dead_row = page.wait_for_selector(f"#dead [data-job='{dead_id}']")
            assert "not configured" in dead_row.inner_text()
            dead_row.query_selector("button").click()
            page.wait_for_selector(f"#dead [data-job='{dead_id}']", state="detached")
            page.wait_for_selector(f"[data-study='{study}'] [data-job='{dead_id}'] [data-state=queued]")
            page.click("#signout")  # signed out: the page asks for the token again and shows nothing
            page.wait_for_selector("#signin", state="visible")
            assert page.is_hidden("#main")
            page.reload()
            page.wait_for_selector("#signin", state="visible")
        finally:
            browser.close()
    assert outside == [] and errors == []
    jobs = {j["id"]: j for j in httpx.get(f"{base}/api/jobs", headers={"Authorization": "Bearer s3cret"}).json()}
    assert jobs[dead_id]["state"] == "queued"
    # a change with the sign-in cookie but without the page's header is refused (another site's form)
    session = httpx.post(f"{base}/api/session", json={"token": "s3cret"}).cookies
    forged = httpx.post(f"{base}/api/jobs/{dead_id}/retry", cookies=session)
    assert forged.status_code == 403
