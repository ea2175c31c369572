"""A private RabbitMQ broker for tests: Debian's rabbitmq-server (scripts/setup.sh installs it) run from a
temporary directory on free loopback ports, with its own epmd, node name, Erlang cookie, database and logs,
so that it never meets a system broker or another test's broker."""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peers import free_port

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # the broker itself; /usr/sbin's wrapper would `su rabbitmq`
PLUGINS = "/usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins"
EPMD = shutil.which("epmd") or "/usr/bin/epmd"

# listeners on loopback only; guest (the default user, loopback-only) stays; no alarm on a small tmp disk
CONFIG = """\
listeners.tcp.1 = 127.0.0.1:{port}
loopback_users.guest = true
default_user = guest
default_pass = guest
disk_free_limit.absolute = 1MB
log.console = false
log.file.level = info
"""


class RabbitMQ:
    """A rabbitmq-server whose state lives in `base`; start() and stop() as often as needed, the data stays."""

    def __init__(self, base: Path, port: int | None = None, start_timeout: float = 60, stop_timeout: float = 30):
        self.base = Path(base)
        self.port = port or free_port()
        self.dist_port, self.epmd_port = free_port(), free_port()
        self.node = f"rabbit-{self.port}@localhost"
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None  # how long the last start() took
        for d in ("home", "mnesia", "log", "conf.d"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        self.plugins_dir = _core_apps(self.base / "plugins")
        (self.base / "rabbitmq.conf").write_text(CONFIG.format(port=self.port))
        (self.base / "enabled_plugins").write_text("[].\n")  # no plugins (no management UI)
        (self.base / "rabbitmq-env.conf").write_text("")  # instead of /etc/rabbitmq/rabbitmq-env.conf
        cookie = self.base / "home" / ".erlang.cookie"  # Erlang reads $HOME/.erlang.cookie
        if not cookie.exists():
            cookie.write_text(os.urandom(16).hex())
            cookie.chmod(0o400)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def log_file(self) -> Path:
        return self.base / "log" / f"{self.node}.log"

    def env(self) -> dict[str, str]:
        b = self.base
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(b / "home"),
            ERL_EPMD_PORT=str(self.epmd_port), ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_NODENAME=self.node, RABBITMQ_USE_LONGNAME="false",
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1", RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(b / "mnesia"), RABBITMQ_LOG_BASE=str(b / "log"),
            RABBITMQ_CONFIG_FILE=str(b / "rabbitmq.conf"), RABBITMQ_CONFIG_FILES=str(b / "conf.d"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(b / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(b / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(b / "enabled_plugins"),
            # never spawn a detached `epmd -daemon` (it would outlive the test): ours runs in start()
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-start_epmd false",
        )
        if self.plugins_dir:
            env["RABBITMQ_PLUGINS_DIR"] = str(self.plugins_dir)
        return env

    # --- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> RabbitMQ:
        """Start the broker and return once a client can declare a queue; raise with its log tail if not."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        t0 = time.monotonic()
        deadline = t0 + self.start_timeout
        self._start_epmd(deadline)
        with open(self.base / "log" / "console.log", "ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([SERVER], env=self.env(), cwd=self.base, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while not self._ready():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"rabbitmq-server exited with {self.proc.returncode} during start-up\n"
                                       + self.log_tail())
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rabbitmq-server was not ready within {self.start_timeout} s\n"
                                       + self.log_tail())
                time.sleep(0.05)
        except BaseException:
            self.kill()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> int | None:
        """Shut down cleanly (SIGTERM: RabbitMQ stops its listeners and syncs its queues); SIGKILL after
        stop_timeout s. Returns the exit status."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self._killpg(self.proc)
            rc = self.proc.returncode
        self._stop_epmd()
        return rc

    def kill(self) -> None:
        """SIGKILL the whole broker (its process group and its epmd): a crash, nothing flushed."""
        if self.proc is not None:
            self._killpg(self.proc)
        self._stop_epmd(kill=True)

    def restart(self) -> RabbitMQ:
        """stop() and start() on the same ports and data: durable queues and persistent messages survive."""
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for f in (self.base / "log" / "console.log", self.log_file):
            if f.exists():
                tail = f.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {f} ---\n" + "\n".join(tail))
        return "\n".join(parts)

    # --- internals -----------------------------------------------------------------------------------------
    def _ready(self) -> bool:
        """AMQP accepts a connection and the broker declares (and deletes) a queue."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        import amqp  # py-amqp, which kombu (celery) depends on

        try:
            with amqp.Connection(f"127.0.0.1:{self.port}", userid="guest", password="guest", connect_timeout=2,
                                 read_timeout=5, write_timeout=5) as conn:
                ch = conn.channel()
                ch.queue_declare("", exclusive=True, auto_delete=True)
                return True
        except Exception:  # noqa: BLE001 - still booting (connection closed / refused / access refused)
            return False

    def _start_epmd(self, deadline: float) -> None:
        if self.epmd is not None and self.epmd.poll() is None:
            return
        self.epmd = subprocess.Popen([EPMD, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                                     env=self.env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.epmd_port), timeout=0.5):
                    return
            except OSError:
                if self.epmd.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"epmd on port {self.epmd_port} did not start (exit {self.epmd.poll()})")
                time.sleep(0.02)

    def _stop_epmd(self, kill: bool = False) -> None:
        if self.epmd is None:
            return
        if kill:
            self._killpg(self.epmd)
        elif self.epmd.poll() is None:
            self.epmd.terminate()
            try:
                self.epmd.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._killpg(self.epmd)
        self.epmd = None

    @staticmethod
    def _killpg(proc: subprocess.Popen[bytes]) -> None:
        if proc.returncode is None:  # not reaped yet, so its pid (= its group id) is still ours
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the shell, beam.smp and its helpers
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)


def _core_apps(target: Path) -> Path | None:
    """A plugins dir with links to only the Erlang applications that `rabbit` needs (20 of Debian's 70).
    Erlang searches every code path dir for each module it loads and RabbitMQ reads every plugin's config
    schema: this saves 1-2 s of each start. None (use Debian's dir) if the layout is not as expected."""
    found = sorted(glob.glob(PLUGINS))
    if not found:
        return None
    dirs = {Path(d).name.rsplit("-", 1)[0]: Path(d) for d in glob.glob(f"{found[-1]}/*-*") if Path(d).is_dir()}
    need, todo = set(), ["rabbit", "rabbitmq_prelaunch"]
    while todo:
        app = todo.pop()
        if app in need:
            continue
        if app not in dirs:
            return None
        need.add(app)
        spec = (dirs[app] / "ebin" / f"{app}.app").read_text()
        for key in ("applications", "included_applications"):
            m = re.search(r"\{\s*" + key + r"\s*,\s*\[([^\]]*)\]", spec)
            deps = re.findall(r"[a-z][a-zA-Z0-9_]*", m.group(1)) if m else []
            todo += [d for d in deps if d in dirs]  # OTP's own (kernel, mnesia...) are not in the plugins dir
    target.mkdir(exist_ok=True)
    for app in need:
        link = target / dirs[app].name
        if not link.is_symlink():
            link.symlink_to(dirs[app])
    return target


@contextmanager
def rabbitmq(tmp_path: Path) -> Iterator[RabbitMQ]:
    """A started private broker under tmp_path/rabbitmq, stopped at exit. As a fixture:
    `@pytest.fixture` / `def broker(tmp_path): with rabbitmq(tmp_path) as b: yield b`."""
    broker = RabbitMQ(tmp_path / "rabbitmq")
    try:
        yield broker.start()
    finally:
        broker.stop()
