"""Scale-out with real parts on loopback: PostgreSQL, RabbitMQ, Orthanc, `segnode serve` with jobs.executor
celery and three `segnode worker` processes, each with its own empty folder (no shared file system). Thirty
series go through while a worker is killed mid-job, the broker restarts and the database restarts: every job
runs to success exactly once and every result reaches Orthanc exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
from sqlalchemy import create_engine, select

from broker import RabbitMQ
from peers import orthanc, start_node_process
from pg import PostgreSQL
from segnode.db.models import AuditEvent
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom
from segnode.phantom.dx import DXOptions, generate_dx, write_dx
from tests.conftest import eventually, storescu

TOKEN = "s3cret"
SERIES = 30
CT_SERIES = 3


def _worker(node_url: str, broker: str, folder: Path, name: str, log: Path) -> subprocess.Popen[bytes]:
    folder.mkdir(parents=True)
    return subprocess.Popen([sys.executable, "-m", "segnode", "worker", "--node", node_url, "--broker", broker,
                             "--work-dir", str(folder), "--name", name, "--device", "cpu", "--no-warm-up"],
                            env=dict(os.environ, SEGNODE_TOKEN=TOKEN), stdout=subprocess.DEVNULL,
                            stderr=open(log, "wb"))


def _jobs(url: str) -> list[dict]:
    try:
        rsp = httpx.get(f"{url}/api/jobs", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    except httpx.HTTPError:
        return []
    return rsp.json() if rsp.status_code == 200 else []  # the database may be restarting


def test_thirty_series_on_three_workers_exactly_once_through_a_kill_and_restarts(tmp_path):
    pg = PostgreSQL().start()
    rabbit = RabbitMQ(tmp_path / "rabbitmq")
    rabbit.start()
    workers: dict[str, subprocess.Popen[bytes]] = {}
    node = None
    try:
        with orthanc(tmp_path / "orthanc") as pacs:
            config = tmp_path / "node.yaml"
            config.write_text(f"""
database_url: {pg.url}
http: {{token: {TOKEN}}}
routing: {{stable_seconds: 0.5, poll_seconds: 0.2, default_destinations: [pacs]}}
jobs: {{executor: celery, broker_url: "{rabbit.url}", workers: 1, lease_seconds: 6, backoff_seconds: 0.5,
        warm_up: false}}
destinations:
  pacs: {{kind: dimse, ae_title: {pacs.aet}, host: 127.0.0.1, port: {pacs.dicom_port}, orthanc_url: "{pacs.url}"}}
""")
            node = start_node_process(tmp_path / "node", "--config", str(config),
                                      stderr=open(tmp_path / "node.log", "wb"))
            for i in range(3):
                workers[f"w{i}"] = _worker(node.url, rabbit.url, tmp_path / f"w{i}", f"w{i}", tmp_path / f"w{i}.log")
            files = []  # 3 CT series (the 3D model) and 27 radiographs (the 2D one): two queues
            for seed in range(CT_SERIES):
                files += write_phantom(generate_ct(100 + seed, CTOptions(matrix=32, slice_spacing=5.0, z_extent_mm=60.0)),
                                       tmp_path / f"ct{seed}")
            for seed in range(SERIES - CT_SERIES):
                files.append(write_dx(generate_dx(200 + seed, DXOptions(matrix=64)), tmp_path / f"dx{seed}"))
            assert storescu(node.dimse_port, files).returncode == 0

            # a worker killed while it holds a job
            def running_on_a_worker():
                return next((j for j in _jobs(node.url) if j["state"] == "running" and j["kind"] == "segment"
                             and j["lease_owner"] in workers), None)

            victim = eventually(running_on_a_worker, timeout=120)
            workers[victim["lease_owner"]].send_signal(signal.SIGKILL)
            rabbit.restart()  # the broker goes away with messages in flight and comes back with them
            pg.restart()  # the state of record goes away and comes back

            def all_done():
                time.sleep(0.5)
                jobs = _jobs(node.url)
                segments = [j for j in jobs if j["kind"] == "segment"]
                deliveries = [j for j in jobs if j["kind"] == "deliver"]
                done = (len(segments) == SERIES and len(deliveries) == SERIES
                        and all(j["state"] == "succeeded" for j in segments + deliveries))
                return jobs if done else None

            jobs = eventually(all_done, timeout=300)
            found = httpx.post(f"{pacs.url}/tools/find", json={"Level": "Series", "Query": {}, "Expand": True},
                               timeout=30).json()
            modalities = Counter(s["MainDicomTags"].get("Modality", "") for s in found)
            instances = Counter(s["MainDicomTags"].get("Modality", "") for s in found for _ in s["Instances"])
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in workers.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if node is not None:
            node.stop()
        rabbit.stop()
        try:
            engine = create_engine(pg.url)
            with engine.connect() as conn:
                events = conn.execute(select(AuditEvent.event_id, AuditEvent.objects, AuditEvent.detail)).all()
            engine.dispose()
        finally:
            pg.close()  # also when the test failed: no cluster left running
    segments = [j for j in jobs if j["kind"] == "segment"]
    assert len({j["series_uid"] for j in segments}) == SERIES  # one job per series
    succeeded = Counter(int(e.objects.split('"job_id":')[1].split(",")[0].rstrip("}")) for e in events
                        if e.event_id == "SN-JOB" and e.detail.startswith("succeeded"))
    assert all(succeeded[j["id"]] == 1 for j in segments + [j for j in jobs if j["kind"] == "deliver"]), succeeded
    workers_used = Counter(e.detail.split("(worker ")[1].split(";")[0] for e in events
                           if e.event_id == "SN-JOB" and e.detail.startswith("succeeded") and "(worker " in e.detail)
    assert sum(workers_used.values()) == SERIES and len(workers_used) >= 2, workers_used
    reaped = [e for e in events if e.event_id == "SN-JOB" and f"worker {victim['lease_owner']}" in e.detail
              and "stopped renewing its lease" in e.detail]
    assert reaped, "the killed worker's job was requeued when its lease expired"
    victim_job = next(j for j in segments if j["id"] == victim["id"])
    assert victim_job["state"] == "succeeded" and victim_job["attempts"] >= 2
    transferred = [e for e in events if e.event_id == "110104" and '"destination":"pacs"' in e.objects
                   and "failed" not in e.detail]
    assert len(transferred) == SERIES  # each result sent once
    assert modalities["SEG"] == SERIES and modalities["SR"] == SERIES, modalities  # one SEG, one SR per series
    assert instances["SEG"] == SERIES and instances["SR"] == SERIES, instances  # and nothing sent twice
    for i in range(3):  # nothing left behind in a worker's folder (the killed one may keep its last job's)
        if f"w{i}" != victim["lease_owner"]:
            assert list((tmp_path / f"w{i}").iterdir()) == []
