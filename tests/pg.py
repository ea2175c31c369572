"""A private PostgreSQL for tests: its own data directory, socket folder and loopback port; restartable."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from peers import free_port


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root; run its tools as the postgres user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class PostgreSQL:
    """initdb in a temporary folder (pytest's are closed to other users), then `start`, `stop`, `restart`
    (same data, same port), `url` (SQLAlchemy, psycopg) and `close` (stop and remove everything)."""

    def __init__(self) -> None:
        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        assert candidates, "PostgreSQL is installed by scripts/setup.sh (apt-get install -y postgresql)"
        self.bindir = Path(candidates[-1]).parent
        self.base = Path(tempfile.mkdtemp(prefix="segnode-pg-"))
        self.data, self.sock = self.base / "data", self.base / "sock"
        self.sock.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres")
            shutil.chown(self.sock, "postgres")
        subprocess.run(_as_postgres([str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                                     "postgres"]), check=True, capture_output=True, timeout=120)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._created = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/segnode"

    def start(self) -> "PostgreSQL":
        self.proc = subprocess.Popen(_as_postgres([str(self.bindir / "postgres"), "-D", str(self.data), "-p",
                                                   str(self.port), "-k", str(self.sock), "-c",
                                                   "listen_addresses=127.0.0.1", "-c", "fsync=off"]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        check = ["createdb", "segnode"] if not self._created else ["psql", "-c", "select 1", "segnode"]
        while subprocess.run(_as_postgres([str(self.bindir / check[0]), "-h", "127.0.0.1", "-p", str(self.port),
                                           "-U", "postgres", *check[1:]]), capture_output=True).returncode != 0:
            assert time.time() < deadline and self.proc.poll() is None, "PostgreSQL did not start"
            time.sleep(0.2)
        self._created = True
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:  # fast shutdown: clients are disconnected
            subprocess.run(_as_postgres([str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast",
                                         "-w", "-t", "30"]), capture_output=True, timeout=60)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
