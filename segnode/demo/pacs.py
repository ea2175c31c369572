"""The PACS of the demo: Orthanc (Debian package, with its DICOMweb plugin) started from a temporary
directory on free loopback ports, or one that is already running (found by its REST URL). Tests use
the same class as their real peer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import httpx

from segnode.tools import ToolMissing

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class PACS(Protocol):
    """What the demo needs to know of a PACS."""

    url: str
    aet: str
    host: str
    dicom_port: int
    username: str | None
    password: str | None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    """Poll `ready` until it holds; fail early if the process exits, or after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} during start-up")
        if ready():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} was not ready within {timeout} s")


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 60, body: str | None = None
              ) -> None:
    """Wait until `url` answers 200 (with `body`, stripped, when given: this server, not another on the port)."""
    def answers() -> bool:
        try:
            rsp = httpx.get(url, timeout=1)
        except httpx.HTTPError:
            return False
        return rsp.status_code == 200 and (body is None or rsp.text.strip() == body)

    wait_until(answers, proc, f"{what} ({url})", timeout)


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    """Wait until `port` accepts connections."""
    def accepts() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_until(accepts, proc, f"{what} (port {port})", timeout)


class Orthanc:
    """A running Orthanc: its ports, AE title and REST base URL."""

    def __init__(self, workdir: Path, aet: str = "ORTHANC", peers: dict[str, tuple[str, str, int]] | None = None,
                 dicomweb: bool = True, dicomweb_servers: dict[str, str] | None = None) -> None:
        if not Path(ORTHANC).exists():
            raise ToolMissing("Orthanc not found; install it with: apt-get install -y orthanc orthanc-dicomweb")
        self.workdir, self.aet, self.host = workdir, aet, "127.0.0.1"
        self.username: str | None = None
        self.password: str | None = None
        self.dicom_port, self.http_port = free_port(), free_port()
        config = {
            "Name": "segnode-test-orthanc",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {name: list(v) for name, v in (peers or {}).items()},
            "Plugins": [DICOMWEB_PLUGIN] if dicomweb and Path(DICOMWEB_PLUGIN).exists() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/",
                         "Servers": {name: [url] for name, url in (dicomweb_servers or {}).items()}},
            "StableAge": 2,
        }
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Orthanc":
        log = (self.workdir / "orthanc.log").open("wb")
        # Orthanc's DICOM stack is DCMTK: without TCP_NODELAY=1 each message stalls ~40 ms (Nagle)
        self.proc = subprocess.Popen([ORTHANC, str(self.workdir / "orthanc.json")], stdout=log, stderr=log,
                                     cwd=self.workdir, env=dict(os.environ, TCP_NODELAY="1"))
        wait_http(f"{self.url}/system", self.proc, "Orthanc")
        wait_port(self.dicom_port, self.proc, "Orthanc")
        return self

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `grace` s (Orthanc's own shutdown takes about 3 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class RunningOrthanc:
    """An Orthanc someone else started (a container, a hospital's test PACS): found by its REST URL,
    which tells its AE title and DICOM port (GET /system)."""

    url: str
    aet: str
    dicom_port: int
    host: str
    username: str | None = None
    password: str | None = None

    @classmethod
    def at(cls, url: str, dicom_host: str | None = None) -> "RunningOrthanc":
        """URL may carry credentials (http://user:password@host:8042); the DICOM host defaults to the URL's."""
        parsed = httpx.URL(url)
        user, password = parsed.username or None, parsed.password or None
        base = str(parsed.copy_with(username=None, password=None)).rstrip("/")
        auth = httpx.BasicAuth(user, password or "") if user else None
        try:
            rsp = httpx.get(f"{base}/system", auth=auth, timeout=10)
        except httpx.HTTPError as exc:
            raise ToolMissing(f"no Orthanc answers at {base} ({exc}); start it, or leave --orthanc out to have "
                              f"the demo start its own") from exc
        if rsp.status_code != 200:
            raise ToolMissing(f"Orthanc at {base} answered HTTP {rsp.status_code} to GET /system"
                              + (" (give its credentials as http://user:password@host:port)" if rsp.status_code == 401 else ""))
        system = rsp.json()
        return cls(base, str(system["DicomAet"]), int(system["DicomPort"]), dicom_host or parsed.host,
                   user, password)

    def __enter__(self) -> "RunningOrthanc":
        return self

    def __exit__(self, *exc: object) -> None:  # not ours to stop
        return None


@contextmanager
def orthanc(workdir: Path, **kwargs: object) -> Iterator[Orthanc]:
    server = Orthanc(workdir, **kwargs).start()  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
