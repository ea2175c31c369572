"""One supervised stage of `segnode serve`, as its own process:

    python -m segnode.stage completion|worker NAME      (settings as JSON on standard input)

The supervisor (segnode.supervisor) starts it and writes the node's effective settings - the file
and the command-line flags applied - to its standard input, so the child sees exactly what `serve`
validated, and destination secrets appear neither in the process list nor in its environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from typing import BinaryIO

from segnode import pipeline
from segnode.config import Settings
from segnode.logs import setup_logging
from segnode.delivery.dimse_client import configure_pynetdicom
from segnode.dicom.charsets import configure_pydicom

log = logging.getLogger("segnode.stage")


def read_settings(stream: BinaryIO) -> Settings:
    """The settings the supervisor wrote (segnode.supervisor.settings_payload)."""
    return Settings.model_validate(json.loads(stream.read()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segnode.stage", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["completion", "worker"])
    parser.add_argument("name", help="the name the supervisor gave this child (e.g. worker-2)")
    args = parser.parse_args(argv)
    settings = read_settings(sys.stdin.buffer)
    setup_logging(settings.log_level)
    configure_pynetdicom()
    configure_pydicom()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.kind == "completion":
        pipeline.completion(settings).run(stop.is_set, settings.routing.poll_seconds)
        return 0
    worker = pipeline.worker(settings)
    worker.owner += f"/{args.name}"
    if settings.jobs.warm_up and settings.jobs.executor == "local":  # under celery it only delivers
        try:
            models = pipeline.rule_models(settings)
        except Exception as exc:  # noqa: BLE001 - warming is an optimisation; jobs still run and say why
            log.warning("no model warmed up: the rules could not be read (%s)", exc)
            models = []
        worker.warm(models)
    worker.run(stop.is_set)
    return 0


if __name__ == "__main__":
    sys.exit(main())
