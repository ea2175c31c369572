"""A real RabbitMQ (tests/broker.py): persistent messages outlive a broker restart, and a Celery task makes the
round trip through it to an in-process worker."""

from __future__ import annotations

import threading

import pytest
from broker import RabbitMQ, rabbitmq
from kombu import Connection, Exchange, Queue


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with rabbitmq(tmp_path_factory.mktemp("broker")) as b:
        yield b


def test_persistent_message_survives_a_restart(broker: RabbitMQ):
    queue = Queue("durable-jobs", Exchange("durable-jobs", type="direct", durable=True), routing_key="job",
                  durable=True)
    with Connection(broker.url, connect_timeout=5) as conn:
        conn.Producer().publish({"job": 42}, exchange=queue.exchange, routing_key="job", declare=[queue],
                                delivery_mode="persistent", serializer="json", retry=False)
    broker.restart()
    assert broker.start_seconds is not None and broker.start_seconds < 60
    with Connection(broker.url, connect_timeout=5) as conn:
        q = queue(conn.default_channel)
        msg = q.get(no_ack=False)
        assert msg is not None, "the persistent message was lost in the restart"
        assert msg.payload == {"job": 42} and msg.properties["delivery_mode"] == 2
        msg.ack()
        assert q.get() is None  # consumed, exactly once


def test_celery_task_round_trip(broker: RabbitMQ):
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    app = Celery("segnode_broker_test", broker=broker.url, set_as_current=False)
    app.conf.update(task_acks_late=True, result_backend=None, task_ignore_result=True, broker_connection_timeout=5,
                    worker_hijack_root_logger=False, broker_connection_retry_on_startup=False)
    ran = threading.Event()
    seen: list[int] = []

    @app.task(name="segnode.test.record")
    def record(n: int) -> None:
        seen.append(n)
        ran.set()

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20) as worker:
        # the worker's event loop only sees the stop flag between polls, which wait up to 10 s for the next
        # timer when idle: a short no-op timer makes leaving this block take well under a second
        worker.timer.call_repeatedly(0.2, lambda: None)
        record.delay(7)
        assert ran.wait(20), "the worker did not run the task"
    assert seen == [7]
    with Connection(broker.url) as conn:  # acked after running (acks_late): nothing left in its queue
        assert conn.default_channel.queue_declare("celery", passive=True).message_count == 0
