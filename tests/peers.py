"""Real DICOM peers on loopback for tests and benchmarks: segnode itself as a process, dcmtk's
storescp, and (from segnode.demo.pacs, which the demo ships) Orthanc with DICOMweb - each started
from a temporary directory on free ports and stopped after."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator


from segnode.demo.pacs import Orthanc, RunningOrthanc, free_port, wait_http, wait_port  # noqa: F401
from segnode.tools import dcmtk


@contextmanager
def orthanc(workdir: Path, **kwargs: object) -> Iterator[Orthanc]:
    """A throwaway test PACS (segnode.demo.pacs.Orthanc): not given the seconds of its graceful shutdown, as
    its folder goes with the test."""
    server = Orthanc(workdir, **kwargs).start()  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop(grace=0.3)


@dataclass
class NodeProcess:
    """`segnode serve` as its own process, as it is deployed."""

    proc: subprocess.Popen[bytes]
    dimse_port: int
    http_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=30)


def start_node_process(data_dir: Path, *args: str, dimse_port: int | None = None, http_port: int | None = None,
                       stderr: int | IO[bytes] | None = subprocess.DEVNULL,
                       env: dict[str, str] | None = None) -> NodeProcess:
    """Start `segnode serve` on free (or given) ports and wait until its HTTP side answers."""
    dimse, http = dimse_port or free_port(), http_port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "segnode", "serve", "--data-dir", str(data_dir), "--dimse-port",
                             str(dimse), "--http-port", str(http), *args], stderr=stderr, env=env)
    try:
        wait_http(f"http://127.0.0.1:{http}/healthz", proc, "segnode")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return NodeProcess(proc, dimse, http)


@contextmanager
def storescp(workdir: Path, aet: str = "STORESCP") -> Iterator[int]:
    """dcmtk's storescp writing into workdir; yields its port."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([dcmtk("storescp"), "-aet", aet, "-od", str(workdir), "-q",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, TCP_NODELAY="1"))
    try:
        wait_port(port, proc, "storescp")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=20)
