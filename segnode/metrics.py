"""Prometheus metrics (prometheus-client), served at /metrics.

Counted where the work happens, in whichever process does it: instances and bytes in the listener,
stage latencies in completion and the workers. Under `segnode serve` every process writes to
DATA_DIR/metrics (prometheus-client's multiprocess mode: `serve` sets PROMETHEUS_MULTIPROC_DIR before
anything imports prometheus-client: segnode.supervisor.share_metrics; the stage processes inherit it, and
/metrics merges them). What the
database or the listener knows now (queue depth, dead letter, associations, free disk) is read when
scraped (`NodeCollector`).

Names follow Prometheus conventions: seconds and bytes, `_total` for counters.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from segnode.health import Health
    from segnode.ingest.store import StoreService

log = logging.getLogger(__name__)
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

INSTANCES_RECEIVED = Counter("segnode_instances_received_total",
                    "Instances received, by channel (dimse, stow) and DIMSE status (0000 stored, A700 out of "
                    "resources, C210 cannot understand, ...)", ["channel", "status"])
RECEIVED_BYTES = Counter("segnode_received_bytes_total", "Bytes of the instances stored, by channel", ["channel"])
STAGE_SECONDS = Histogram(
    "segnode_stage_seconds",
    "Seconds per stage: receive (last byte to answer, per instance), completion_wait (last instance to the "
    "series completed), queue_wait (job queued to claimed), read / preprocess / windows / resample / "
    "postprocess (inference), encode (SEG + SR), deliver (per delivery job)", ["stage"], buckets=_LATENCY)
HTTP_REFUSALS = Counter("segnode_http_refusals_total", "HTTP requests refused, by status (401 no or wrong token, "
                        "400, 404, 413, ...); each is counted, a peer's repeats are audited once a minute",
                        ["status"])
MODEL_LOAD_SECONDS = Histogram("segnode_model_load_seconds", "Seconds to load a model (manifest, weights, network "
                               "on its device), once per worker", ["model"], buckets=_LATENCY)
GPU_MEMORY = Gauge("segnode_gpu_memory_bytes", "GPU memory held by PyTorch in a worker after its last job "
                   "(peak in that job)", ["kind"], multiprocess_mode="liveall")


def record_gpu_memory() -> None:
    """After a job: the peak GPU memory PyTorch held during it, then reset the peak (no GPU: nothing)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return
    GPU_MEMORY.labels("peak_allocated").set(torch.cuda.max_memory_allocated())
    GPU_MEMORY.labels("reserved").set(torch.cuda.memory_reserved())
    torch.cuda.reset_peak_memory_stats()


def mark_process_dead(pid: int) -> None:
    """A stage process ended: drop its live gauges (multiprocess mode only)."""
    if os.environ.get(MULTIPROCESS_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


@contextmanager
def timed(stage: str) -> Iterator[None]:
    """Observe the block's duration as `segnode_stage_seconds{stage=...}` (also when it raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        STAGE_SECONDS.labels(stage).observe(time.perf_counter() - start)


class NodeCollector(Collector):
    """What is true now, read at each scrape: jobs by state and kind, the dead letter, associations under
    way, free disk and the watermark, and each readiness check (1 passing, 0 failing).

    Args:
        store: the node's store (its database, data directory and free-space watermark).
        associations: the number of associations under way (the DIMSE listener's).
        health: the readiness checks (segnode.health).
    """

    def __init__(self, store: "StoreService", associations: Callable[[], int], health: "Health") -> None:
        self.store, self.associations, self.health = store, associations, health

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from sqlalchemy import func, select

        from segnode.db.models import JOBS
        from segnode.flow import JobKind, JobState

        jobs = GaugeMetricFamily("segnode_jobs", "Jobs in the queue by state and kind", labels=["state", "kind"])
        counts = {(s.value, k.value): 0 for s in JobState for k in JobKind}
        with self.store.engine.connect() as conn:
            for state, kind, n in conn.execute(select(JOBS.c.state, JOBS.c.kind, func.count()).group_by(JOBS.c.state, JOBS.c.kind)):
                counts[(state, kind)] = n
        for (state, kind), n in sorted(counts.items()):
            jobs.add_metric([state, kind], n)
        yield jobs
        dead = GaugeMetricFamily("segnode_dead_letter_jobs", "Jobs that will not run again until retried (state dead)")
        dead.add_metric([], sum(n for (state, _), n in counts.items() if state == JobState.DEAD.value))
        yield dead
        assoc = GaugeMetricFamily("segnode_dimse_associations", "DIMSE associations under way")
        assoc.add_metric([], self.associations())
        yield assoc
        disk = GaugeMetricFamily("segnode_disk_free_bytes", "Free bytes on the data directory's file system")
        disk.add_metric([], shutil.disk_usage(self.store.spool.root).free)
        yield disk
        watermark = GaugeMetricFamily("segnode_disk_watermark_bytes", "storage.free_space_watermark_mb in bytes: "
                                      "below it new associations are refused")
        watermark.add_metric([], self.store.watermark_mb * 2**20)
        yield watermark
        failing = self.health.failing()
        ready = GaugeMetricFamily("segnode_ready_check", "Readiness checks (/readyz): 1 passing, 0 failing",
                                  labels=["check"])
        for name in self.health.names:
            ready.add_metric([name], 0 if name in failing else 1)
        yield ready


def exposition(node_registry: CollectorRegistry) -> bytes:
    """The text exposition of every process's metrics (merged in multiprocess mode) and the node's own."""
    from prometheus_client import REGISTRY

    if os.environ.get(MULTIPROCESS_ENV):
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        body = generate_latest(merged)
    else:
        body = generate_latest(REGISTRY)
    return body + generate_latest(node_registry)
