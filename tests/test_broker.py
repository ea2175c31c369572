"""The node's side of the broker (jobs.executor celery) against a real RabbitMQ (tests/broker.py): runnable
segment jobs are published once, to their model's queue (or the one jobs.queues names), most urgent first;
deliveries stay on the node; a broker that is down keeps the node receiving and says so in /readyz."""

from __future__ import annotations

import httpx
import pytest
from kombu import Connection, Queue
from pydantic import SecretStr

from broker import RabbitMQ, rabbitmq
from peers import free_port
from segnode.audit.ledger import Ledger
from segnode.flow import JobKind, JobSpec
from segnode.jobs import queue
from segnode.jobs.broker import MAX_PRIORITY, TASK
from segnode.jobs.dispatch import Dispatcher
from tests.conftest import eventually, storescu


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with rabbitmq(tmp_path_factory.mktemp("broker")) as b:
        yield b


def _enqueue(node, model: str, priority: int, kind: JobKind = JobKind.SEGMENT, series: str = "1.2.3.4") -> int:
    spec = JobSpec(kind=kind, series_uid=series, study_uid="1.2.3", generation=1, model=model, model_version="1",
                   weights_sha256="0" * 64, input_sha256=f"{priority:064d}", instances=1, rule="r",
                   ruleset_sha256="0" * 64, priority=priority,
                   **({"destination": "pacs", "parent_job": 1, "parent_key": "k"} if kind == JobKind.DELIVER else {}))
    with Ledger(node.engine, node.trail).transaction() as (conn, append):
        job_id, _ = queue.enqueue(conn, append, spec, 3)
    return job_id


def _drain(url: str, name: str) -> list[tuple[int, str]]:
    """(job id, task name) of every message in queue `name`, in the order RabbitMQ hands them out."""
    out = []
    with Connection(url, connect_timeout=5) as conn:
        q = Queue(name, durable=True, queue_arguments={"x-max-priority": MAX_PRIORITY + 1})(conn.default_channel)
        while (msg := q.get(no_ack=False)) is not None:
            out.append((msg.payload[0][0], msg.headers["task"]))
            msg.ack()
    return out


def test_runnable_jobs_go_to_their_models_queue_most_urgent_first_once(start_node, broker: RabbitMQ):
    node = start_node()  # the node's own dispatcher is not started: this test polls one itself
    celery = node.settings.jobs.model_copy(update={"executor": "celery", "broker_url": SecretStr(broker.url),
                                                   "queues": {"big-ct": "gpu"}})
    routine = _enqueue(node, "ct", 0, series="1.2.3.1")
    urgent = _enqueue(node, "ct", 7, series="1.2.3.2")
    very = _enqueue(node, "ct", 50, series="1.2.3.3")  # clamped to the broker's 0..9
    gpu = _enqueue(node, "big-ct", 0, series="1.2.3.4")
    _enqueue(node, "ct", 9, kind=JobKind.DELIVER, series="1.2.3.5")  # deliveries are the node's own work
    dispatcher = Dispatcher(node.settings.model_copy(update={"jobs": celery}), Ledger(node.engine, node.trail))
    assert dispatcher.poll() == 4
    assert dispatcher.poll() == 0  # published: not again before the lease has passed
    assert _drain(broker.url, "segnode.ct") == [(very, TASK), (urgent, TASK), (routine, TASK)]
    assert _drain(broker.url, "gpu") == [(gpu, TASK)]


def test_a_broker_that_is_down_keeps_the_node_receiving_and_is_named_in_readiness(start_node, ct_files):
    node = start_node(jobs={"executor": "celery", "broker_url": f"amqp://guest:guest@127.0.0.1:{free_port()}//"},
                      routing={"stable_seconds": 0.3, "poll_seconds": 0.2})
    assert storescu(node.dimse.port, ct_files).returncode == 0  # C-STOREs are answered as usual

    def not_ready():
        rsp = httpx.get(f"http://127.0.0.1:{node.http_port}/readyz", timeout=10)
        return rsp.json()["failing"].get("broker") if rsp.status_code == 503 else None

    reason = eventually(not_ready, timeout=30)
    assert "segmentations wait in the queue" in reason
