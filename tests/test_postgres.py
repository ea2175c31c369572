"""The same node on PostgreSQL: migrations, ingest, duplicates, API and audit verification."""

from __future__ import annotations

import subprocess
import sys
import threading

import httpx
import pytest
from sqlalchemy import text

from segnode import pipeline
from segnode.audit.ledger import Ledger
from segnode.audit.trail import verify_connection
from segnode.jobs import queue
from pg import PostgreSQL
from tests.conftest import instances, storescu
from tests.test_pipeline import _queue_jobs


@pytest.fixture(scope="module")
def pg_url():
    server = PostgreSQL().start()
    try:
        yield server.url
    finally:
        server.close()


def test_node_on_postgresql(start_node, pg_url, ct_files, tmp_path):
    node = start_node(database_url=pg_url)
    for _ in range(2):
        assert storescu(node.dimse.port, ct_files).returncode == 0
    rows = instances(node)
    assert len(rows) == len(ct_files) and {r.version for r in rows} == {1}
    studies = httpx.get(f"http://127.0.0.1:{node.http_port}/api/studies", timeout=10).json()
    assert studies[0]["series"][0]["instances"] == len(ct_files)
    node.stop()
    cfg = tmp_path / "pg.yaml"
    cfg.write_text(f"database_url: {pg_url}\n")
    verify = subprocess.run([sys.executable, "-m", "segnode", "audit", "verify", "--config", str(cfg), "--data-dir",
                             str(node.settings.data_dir)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and f"{2 * len(ct_files) + 2} events" in verify.stdout, verify.stdout
    assert "no head anchor" not in verify.stdout


def test_workers_share_a_postgresql_queue_without_running_a_job_twice(start_node, pg_url):
    node = start_node(database_url=pg_url)
    ids = _queue_jobs(node, Ledger(node.engine, node.trail), 16)
    ran: list[int] = []
    lock = threading.Lock()

    def runner(job, files, out):
        with lock:
            ran.append(job.id)
        return "ok"

    workers = [pipeline.worker(node.settings, pipeline.ledger(node.settings), runner=runner) for _ in range(3)]
    for n, w in enumerate(workers):
        w.owner += f"-{n}"
    threads = [threading.Thread(target=lambda w=w: [None for _ in iter(w.run_once, False)]) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ran) == ids
    with node.engine.connect() as conn:
        assert {j.state for j in queue.list_jobs(conn) if j.id in ids} == {"succeeded"}
        assert conn.execute(text("select count(*) from jobs where state = 'running'")).scalar() == 0
    with node.engine.connect() as conn:
        assert verify_connection(conn).ok  # concurrent appends from three workers kept one chain
