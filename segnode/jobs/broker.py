"""The Celery side shared by the node (which publishes segment jobs) and `segnode worker` (which runs them).

The database stays the state of record: a message carries only a job id. A worker claims the job from the
node over HTTP (segnode.web.work) before running it, so a message delivered twice, or published again,
runs the job at most once at a time and its result is accepted once. Messages are acknowledged late (after
the result is back on the node) and given back when a worker dies, so RabbitMQ redelivers them.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

TASK = "segnode.segment"
MAX_PRIORITY = 9  # RabbitMQ priority queues (x-max-priority); a rule's priority is clamped to 0..9


def celery_app(broker_url: str, **conf: Any) -> Celery:
    """A Celery app for `broker_url` with the settings both sides must agree on (queues are declared with the
    same arguments by whichever side declares them first)."""
    app = Celery("segnode", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,  # acknowledged after the task returns: a worker killed mid-job loses nothing
        task_reject_on_worker_lost=True,  # ... and its message goes back to the queue
        worker_prefetch_multiplier=1,  # one job at a time per process: the others stay for idle workers
        task_queue_max_priority=MAX_PRIORITY + 1,
        task_default_priority=0,
        task_serializer="json", accept_content=["json"], result_backend=None, task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"confirm_publish": True},  # a publish returns once the broker has it
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        **conf,
    )
    return app


def queue_for(model: str, queues: dict[str, str]) -> str:
    """The broker queue a model's jobs go to: `jobs.queues[model]`, else segnode.<model>."""
    return queues.get(model) or f"segnode.{model}"


def priority_for(rule_priority: int) -> int:
    """A rule's priority (any int, higher first) as a broker priority 0..MAX_PRIORITY."""
    return max(0, min(MAX_PRIORITY, int(rule_priority)))
