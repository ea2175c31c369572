"""`segnode serve` runs the listener in its own process and each later stage - completion with
routing, and every worker - as a child process it watches: a crashed child is restarted (with a
growing delay when it keeps crashing) while the listener keeps receiving. Children die with their
parent (PR_SET_PDEATHSIG), so a killed node leaves no orphan holding the database."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pydantic import SecretStr

from segnode.config import Settings

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1
HEALTHY_AFTER = 60.0  # a child that ran this long has its restart delay reset


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


@dataclass
class Child:
    """One supervised stage process and its restart bookkeeping (times from time.monotonic, in s)."""

    name: str  # "completion" or "worker-N"
    kind: str  # the stage: "completion" or "worker" (segnode.stage's first argument)
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    history: list[int] = field(default_factory=list)  # exit codes seen


class Supervisor:
    """Starts completion and `jobs.workers` workers as `python -m segnode.stage` children and restarts
    them when they exit; `on_exit(name, exit status, restart delay in s, pid)` is told of each exit.

    The restart delay doubles with each quick exit (0.5 s * 2**n, at most 30 s) and starts over once
    a child ran longer than HEALTHY_AFTER (60 s). A negative exit status is the signal that ended it.
    `on_exit` runs on the watcher thread.
    """

    def __init__(self, settings: Settings, on_exit: Callable[[str, int, float, int], None] | None = None) -> None:
        self.settings = settings
        self.children = [Child("completion", "completion")] + [
            Child(f"worker-{i + 1}", "worker") for i in range(settings.jobs.workers)]
        self.on_exit = on_exit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._timeout = 20.0
        self._payload = settings_payload(settings)

    def _spawn(self, child: Child) -> None:
        # -P: not the working directory first on sys.path (a segnode/ or a torch.py there would be imported);
        # the segnode this process runs comes first instead, so a child never runs another version of the code
        source = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH", "")) if p)
        child.proc = subprocess.Popen([sys.executable, "-P", "-m", "segnode.stage", child.kind, child.name],
                                      stdin=subprocess.PIPE, preexec_fn=_die_with_parent,
                                      env=dict(os.environ, PYTHONPATH=path))
        assert child.proc.stdin is not None
        try:
            child.proc.stdin.write(self._payload)
            child.proc.stdin.close()
        except BrokenPipeError:  # it died at once; the watcher sees the exit and restarts it
            pass
        child.started = time.monotonic()
        log.info("started %s (pid %d)", child.name, child.proc.pid)

    def workers_not_running(self) -> str | None:
        """None while at least one worker process runs, else the readiness reason."""
        workers = [c for c in self.children if c.kind == "worker"]
        if any(c.proc is not None and c.proc.poll() is None for c in workers):
            return None
        exits = ", ".join(f"{c.name} {c.history[-1]}" for c in workers if c.history)
        return (f"workers: none of {len(workers)} is running" + (f" (last exit status: {exits})" if exits else "")
                + "; they are restarted with a growing delay, the log says why they exit")

    def start(self) -> None:
        """Start the children, and the thread that watches and restarts them."""
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        # Every child is spawned, restarted and stopped by this one thread: PR_SET_PDEATHSIG fires when
        # the *thread* that forked a child ends (prctl(2)), so the thread that forks must outlive them.
        due: dict[str, float] = {}
        while not self._stop.is_set():
            for child in self.children:
                if child.proc is None:
                    if time.monotonic() >= due.get(child.name, 0):
                        self._spawn(child)
                    continue
                code = child.proc.poll()
                if code is None:
                    continue
                ran = time.monotonic() - child.started
                child.restarts = 0 if ran > HEALTHY_AFTER else child.restarts + 1
                delay = min(30.0, 0.5 * 2 ** child.restarts)
                child.history.append(code)
                log.error("%s (pid %d) exited with status %d after %.0f s; restarting in %.1f s. Its log lines "
                          "above say why; the listener keeps receiving.", child.name, child.proc.pid, code, ran, delay)
                if self.on_exit is not None:
                    try:
                        self.on_exit(child.name, code, delay, child.proc.pid)
                    except Exception:  # noqa: BLE001 - the watcher must live on: its children die with it
                        log.exception("could not record the exit of %s", child.name)
                child.proc = None
                due[child.name] = time.monotonic() + delay
            self._stop.wait(0.5)
        self._terminate_children()

    def stop(self, timeout: float = 20.0) -> None:
        """Stop restarting, SIGTERM the running children and wait up to `timeout` (s) in all for them;
        SIGKILL those still running (a killed worker's job is requeued when its lease expires)."""
        self._timeout = timeout
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _terminate_children(self) -> None:
        running = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for proc in running:
            proc.terminate()
        deadline = time.monotonic() + self._timeout
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop in %.0f s; killed (its job will be requeued)", proc.pid,
                            self._timeout)
                proc.kill()
                proc.wait()


def share_metrics(folder: Path) -> None:
    """Prometheus multiprocess mode for this process and the stage processes it starts (segnode.metrics): an
    empty `folder`, named in PROMETHEUS_MULTIPROC_DIR. prometheus-client reads that when first imported, so
    this runs before anything imports it.

    Raises:
        RuntimeError: prometheus-client was imported already (a bug: its values would stay per process).
    """
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the metrics folder was set")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


def settings_payload(settings: Settings) -> bytes:
    """The settings a child reads on its standard input (segnode.stage.read_settings). Destination secrets
    pass in clear, through a pipe only the child reads: neither its arguments nor its environment hold them.

    Returns:
        UTF-8 JSON of the settings without `http` (the bearer token stays with the listener); paths as
        strings.
    """
    return json.dumps(settings.model_dump(mode="python", exclude={"http"}), default=_plain).encode()


def _plain(value: object) -> object:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return str(value)  # paths
