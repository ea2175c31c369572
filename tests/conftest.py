"""Shared fixtures: a real node on free loopback ports, generated CT data, real DICOM peers."""

from __future__ import annotations

import io
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from sqlalchemy import select

from segnode.config import Settings, load_settings
from segnode.db.models import AuditEvent, Instance
from segnode.delivery.dimse_client import configure_pynetdicom
from segnode.dicom.charsets import configure_pydicom
from segnode.service import Node
from testdata import ct_series
from segnode.tools import dcmtk

os.environ.setdefault("TCP_NODELAY", "1")
configure_pynetdicom()  # the tests' pynetdicom peers: no identifiers in logs, TCP_NODELAY
configure_pydicom()  # as every entry point: ISO 2022 IR 58 with its escape sequence


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": str(data_dir),
        "dimse": {"port": 0},
        "http": {"port": 0},
        "storage": {"free_space_floor_mb": 0, "free_space_watermark_mb": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return load_settings(None, base)


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start an in-process node (DIMSE + HTTP on free ports); stopped at teardown."""
    started: list[Node] = []

    def _start(**overrides: Any) -> Node:
        node = Node(make_settings(tmp_path / f"data{len(started)}", **overrides))
        node.start()
        started.append(node)
        return node

    yield _start
    for node in started:
        node.stop()


@pytest.fixture
def node(start_node: Callable[..., Node]) -> Node:
    return start_node()


@pytest.fixture
def ct_files(tmp_path: Path) -> list[Path]:
    out = tmp_path / "ct"
    out.mkdir()
    paths = []
    for ds in ct_series(n_slices=6, rows=32, cols=32, seed=7):
        path = out / f"{ds.InstanceNumber:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(port: int, files: list[Path], *extra: str, aec: str = "SEGNODE", aet: str = "TESTSCU",
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk("storescu"), "-aec", aec, "-aet", aet, *extra, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=timeout)


def echoscu(port: int, *extra: str, aec: str = "SEGNODE", aet: str = "TESTSCU") -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk("echoscu"), "-aec", aec, "-aet", aet, *extra, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a PS3.10 file, without preamble and file meta."""
    from segnode.dicom.part10 import parse_meta

    raw = path.read_bytes()
    meta = parse_meta(raw)
    assert meta is not None
    return raw[meta.dataset_offset:]


def instances(node: Node) -> list[Any]:
    with node.engine.connect() as conn:
        return list(conn.execute(select(Instance)).all())


def audit_events(node: Node) -> list[Any]:
    with node.engine.connect() as conn:
        return list(conn.execute(select(AuditEvent).order_by(AuditEvent.seq)).all())


def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll until check() is truthy: for what the node records after the peer has already gone away."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"not true within {timeout} s: {getattr(check, '__name__', check)}"
        time.sleep(0.05)
    return result


def echo_ok(node: Node) -> bool:
    """The node still answers C-ECHO."""
    return echoscu(node.dimse.port).returncode == 0


class RawStore:
    """A pynetdicom SCU that can send arbitrary bytes as a C-STORE dataset (for bad inputs)."""

    def __init__(self, port: int, contexts: list[tuple[str, list[str]]], ae_title: str = "TESTSCU") -> None:
        ae = AE(ae_title)
        for abstract, syntaxes in contexts:
            ae.add_requested_context(abstract, syntaxes)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="SEGNODE")
        assert self.assoc.is_established

    def context_id(self, abstract: str, syntax: str) -> int:
        for cx in self.assoc.accepted_contexts:
            if cx.abstract_syntax == abstract and cx.transfer_syntax[0] == syntax:
                return int(cx.context_id)
        raise LookupError(abstract)

    def send(self, raw: bytes, context_id: int, sop_class: str, sop_instance: str, msg_id: int = 1) -> Dataset | None:
        req = C_STORE()
        req.MessageID = msg_id
        req.AffectedSOPClassUID = sop_class
        req.AffectedSOPInstanceUID = sop_instance
        req.Priority = 2
        req.DataSet = io.BytesIO(raw)
        # Pause pynetdicom's reactor so the response comes to us (as send_c_store does internally)
        self.assoc._reactor_checkpoint.clear()
        while not self.assoc._is_paused:
            time.sleep(0.0001)
        try:
            self.assoc.dimse.send_msg(req, context_id)
            _, rsp = self.assoc.dimse.get_msg(block=True)
        finally:
            self.assoc._reactor_checkpoint.set()
        return rsp

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def read_stored(node: Node, sop_instance_uid: str) -> Dataset:
    row = next(r for r in instances(node) if r.sop_instance_uid == sop_instance_uid)
    return dcmread(node.settings.data_dir / row.path)


def associate_rq(abstract_syntax: str, transfer_syntaxes: list[str] | None = None, calling: str = "RAWSCU") -> bytes:
    """An A-ASSOCIATE-RQ proposing one presentation context, as pynetdicom encodes it (for raw-socket peers)."""
    from pynetdicom import build_context
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, "SEGNODE"
    context = build_context(abstract_syntax, transfer_syntaxes)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET <url>/metrics and parse it as Prometheus does: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    rsp = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert rsp.status_code == 200, rsp.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(rsp.text) for s in family.samples}


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=segnode test CA",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(d / f"{name}.key"),
                 "-out", str(d / f"{name}.csr"))
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-days", "2", "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.crt"))
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}
