"""ATNA: every audit event reaches a real syslog collector (Debian's rsyslog on loopback, TLS with
certificates made here), in order, also across a collector restart, with the chain's hashes."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import select

from peers import free_port, wait_port
from segnode.audit.atna import UDP_LIMIT, audit_message, syslog_message
from segnode.db.models import AuditEvent
from segnode.ingest.store import Peer
from tests.conftest import eventually, storescu

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
SD = re.compile(rb'\[segnode@32473 seq="(\d+)" hash="([0-9a-f]{64})" prev="([0-9a-f]{64})"\]')


@contextmanager
def rsyslog(workdir: Path, port: int, pki: dict[str, Path] | None, udp: bool = False,
            client_cert: bool = False) -> Iterator[Path]:
    """rsyslogd in the foreground, receiving syslog over TLS (RFC 5425; `client_cert`: a client certificate
    signed by the CA is required), plain TCP or UDP (`udp`) on `port` and writing each message's raw text as
    one line; yields that file."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "received.log"
    tls = (f'global(workDirectory="{workdir}" DefaultNetstreamDriver="gtls" '
           f'DefaultNetstreamDriverCAFile="{pki["ca_crt"]}" DefaultNetstreamDriverCertFile="{pki["server_crt"]}" '
           f'DefaultNetstreamDriverKeyFile="{pki["server_key"]}")\n'
           f'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="{"x509/certvalid" if client_cert else "anon"}")\n'
           if pki else f'global(workDirectory="{workdir}")\nmodule(load="imtcp")\n')
    conf = workdir / "rsyslog.conf"
    if udp:
        tls = f'global(workDirectory="{workdir}")\nmodule(load="imudp")\n'
    conf.write_text(tls + f'input(type="{"imudp" if udp else "imtcp"}" port="{port}")\n'
                    'template(name="raw" type="string" string="%rawmsg%\\n")\n'
                    f'action(type="omfile" file="{out}" template="raw")\n')
    proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(conf), "-i", str(workdir / "rsyslogd.pid")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if udp:
            eventually(lambda: out.parent.joinpath("rsyslogd.pid").exists() or proc.poll() is not None, timeout=10)
            time.sleep(0.5)  # the pid file is written before the inputs open
        else:
            wait_port(port, proc, "rsyslogd")
        yield out
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _received(out: Path) -> list[tuple[int, str, bytes]]:
    if not out.exists():
        return []
    found = []
    for line in out.read_bytes().splitlines():
        m = SD.search(line)
        if m:
            found.append((int(m.group(1)), m.group(2).decode(), line))
    return found


def _events(node) -> list[AuditEvent]:
    with node.engine.connect() as conn:
        return list(conn.execute(select(AuditEvent.__table__).order_by(AuditEvent.seq)).all())


def _all_arrived(node, out: Path) -> list[tuple[int, str, bytes]] | None:
    events, got = _events(node), _received(out)
    return got if events and {seq for seq, _, _ in got} >= {e.seq for e in events} else None


@pytest.mark.parametrize("transport", ["tls", "tcp"])
def test_every_event_reaches_the_collector_in_order_across_a_restart(start_node, ct_files, pki, tmp_path, transport):
    port = free_port()
    dest = {"name": "arr", "host": "127.0.0.1", "port": port, "transport": transport, "ca_file": str(pki["ca_crt"])}
    pki = pki if transport == "tls" else None
    with rsyslog(tmp_path / "collector", port, pki) as out:
        node = start_node(audit={"syslog": [dest]})
        assert storescu(node.dimse.port, ct_files[:3]).returncode == 0
        eventually(lambda: _all_arrived(node, out), timeout=30)
    assert storescu(node.dimse.port, ct_files[3:]).returncode == 0  # the collector is down meanwhile
    assert node.atna[0].waiting() > 0
    with rsyslog(tmp_path / "collector", port, pki) as out:
        got = eventually(lambda: _all_arrived(node, out), timeout=60)
        events = {e.seq: e for e in _events(node)}
        cursor = node.settings.data.atna / "arr.cursor"  # confirmed once the connection outlives the batch
        eventually(lambda: cursor.exists() and int(cursor.read_text()) == max(events), timeout=10)
    first_seen = list(dict.fromkeys(seq for seq, _, _ in got))
    assert first_seen == sorted(first_seen) == sorted(events)  # every event, in order (a resent batch may repeat)
    for seq, digest, line in got:
        assert digest == events[seq].hash  # the chain as written: tampering on the node shows at the collector
        assert line.startswith(b"<85>1 ") and b" segnode " in line and b" IHE+RFC-3881 " in line
        message = ET.fromstring(line[line.index(b"<?xml"):])
        assert message.find("EventIdentification/EventID").get("csd-code") == events[seq].event_id
    stored = [e for e in events.values() if e.event_id == "110104" and e.outcome == 0]
    assert len(stored) == len(ct_files)


def test_udp_delivers_to_a_collector_that_listens(start_node, ct_files, tmp_path):
    port = free_port()
    with rsyslog(tmp_path / "collector", port, None, udp=True) as out:
        node = start_node(audit={"syslog": [{"name": "udp", "host": "127.0.0.1", "port": port, "transport": "udp"}]})
        assert storescu(node.dimse.port, ct_files[:2]).returncode == 0
        got = eventually(lambda: _all_arrived(node, out), timeout=30)
    assert [seq for seq, _, _ in got] == sorted(e.seq for e in _events(node) if e.seq <= got[-1][0])


def test_a_collector_that_is_down_delays_nothing_and_is_named_in_the_log(start_node, ct_files, pki, caplog):
    dest = {"name": "arr", "host": "127.0.0.1", "port": free_port(), "transport": "tls", "ca_file": str(pki["ca_crt"])}
    node = start_node(audit={"syslog": [dest]})
    assert storescu(node.dimse.port, ct_files).returncode == 0  # answered as usual
    eventually(lambda: "ATNA destination arr (127.0.0.1" in caplog.text, timeout=10)
    eventually(lambda: node.atna[0].waiting() >= len(ct_files), timeout=10)  # kept, to be sent later


def test_the_audit_message_says_what_the_event_says():
    row = {"seq": 7, "time": "2026-11-30T10:00:00.000001+00:00", "event_id": "110104",
           "event_name": "DICOM Instances Transferred", "action": "C", "outcome": 0, "status": 0,
           "actor": '{"ae_title":"CT1","host":"10.1.2.3","protocol":"dimse"}',
           "objects": '{"study_uid":"1.2.3","sop_instance_uid":"1.2.3.4","patient_key":"ab12"}',
           "detail": "a <b> & c", "prev_hash": "0" * 64, "hash": "1" * 64}
    message = ET.fromstring(audit_message(row, "SEGNODE"))
    event = message.find("EventIdentification")
    assert event.get("EventActionCode") == "C" and event.get("EventOutcomeIndicator") == "0"
    assert event.find("EventID").get("codeSystemName") == "DCM"
    assert event.find("EventOutcomeDescription").text == "a <b> & c"
    participant = message.find("ActiveParticipant")
    assert participant.get("UserID") == "CT1" and participant.get("NetworkAccessPointID") == "10.1.2.3"
    assert message.find("AuditSourceIdentification").get("AuditSourceID") == "SEGNODE"
    ids = {o.find("ParticipantObjectIDTypeCode").get("csd-code"): o.get("ParticipantObjectID")
           for o in message.findall("ParticipantObjectIdentification")}
    assert ids["110180"] == "1.2.3" and ids["2"] == "ab12"
    assert participant.get("NetworkAccessPointTypeCode") == "2"  # an IP address (1: a machine name)
    roles = [(p.get("UserID"), p.find("RoleIDCode").get("csd-code")) for p in message.findall("ActiveParticipant")]
    assert roles == [("CT1", "110153"), ("SEGNODE", "110152")]  # the modality sent, the node received
    frame = syslog_message(row, "SEGNODE", "node1")
    assert frame.startswith(b"<85>1 2026-11-30T10:00:00.000001Z node1 segnode ")
    assert b'[segnode@32473 seq="7" hash="' + b"1" * 64 + b'"' in frame


def test_what_a_peer_chose_cannot_break_the_message_or_the_datagram():
    """A path with control characters stays valid XML, escaped; an event too long for a UDP datagram goes
    shortened (valid, with the chain's hashes), saying where the whole event is."""
    row = {"seq": 9, "time": "2026-11-30T10:00:00+00:00", "event_id": "110100", "event_name": "Application Activity",
           "action": "E", "outcome": 4, "status": None, "actor": '{"host":"localhost","protocol":"http"}',
           "objects": '{"path":"/a\\u0001b"}', "detail": "GET /x\x1b[2J\x00y: refused", "prev_hash": "0" * 64,
           "hash": "2" * 64}
    message = ET.fromstring(audit_message(row, "SEGNODE"))
    assert message.find("EventIdentification/EventOutcomeDescription").text == "GET /x\\x1b[2J\\x00y: refused"
    assert message.find("ActiveParticipant").get("NetworkAccessPointTypeCode") == "1"  # a name, not an address
    huge = dict(row, detail="x" * 70000, objects='{"study_uid":"1.2.3","path":"' + "p" * 70000 + '"}')
    frame = syslog_message(huge, "SEGNODE", "node1", limit=UDP_LIMIT)
    assert len(frame) <= UDP_LIMIT and b'seq="9" hash="' + b"2" * 64 in frame
    short = ET.fromstring(frame[frame.index(b"<?xml"):])
    assert "audit sequence number 9" in short.find("EventIdentification/EventOutcomeDescription").text
    assert short.find("ParticipantObjectIdentification").get("ParticipantObjectID") == "1.2.3"
    assert len(syslog_message(huge, "SEGNODE", "node1")) > 70000  # TLS and TCP carry it whole


def test_a_stream_of_events_is_confirmed_while_it_flows(start_node, tmp_path):
    """The cursor moves while events keep coming (a batch is confirmed on its own clock, not after a pause)."""
    port = free_port()
    dest = {"name": "arr", "host": "127.0.0.1", "port": port, "transport": "tcp"}
    with rsyslog(tmp_path / "collector", port, None) as out:
        node = start_node(audit={"syslog": [dest]})
        cursor = node.settings.data.atna / "arr.cursor"
        confirmed_while_flowing = False
        for i in range(40):  # 4 s of an event every 0.1 s
            node.store.record_security(Peer("http", "127.0.0.1", 1), f"test event {i}")
            confirmed_while_flowing |= cursor.exists() and int(cursor.read_text()) > 1
            time.sleep(0.1)
        assert confirmed_while_flowing
        eventually(lambda: _all_arrived(node, out), timeout=20)


def test_a_collector_that_answers_is_not_taken_for_gone(start_node, caplog):
    """Bytes from a collector (syslog has no replies) are read and ignored: no reconnecting, no log lines."""
    server = socket.create_server(("127.0.0.1", 0))
    received = bytearray()

    def collector() -> None:
        conn, _ = server.accept()
        conn.settimeout(0.2)
        while True:
            conn.sendall(b"garbage\n")
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return
            received.extend(data)

    threading.Thread(target=collector, daemon=True).start()
    dest = {"name": "chatty", "host": "127.0.0.1", "port": server.getsockname()[1], "transport": "tcp"}
    node = start_node(audit={"syslog": [dest]})
    for i in range(5):
        node.store.record_security(Peer("http", "127.0.0.1", 1), f"test event {i}")
    cursor = node.settings.data.atna / "chatty.cursor"
    events = _events(node)
    eventually(lambda: cursor.exists() and int(cursor.read_text()) == events[-1].seq, timeout=15)
    assert b"test event 4" in received
    assert "ATNA destination chatty" not in caplog.text


def test_a_collector_that_wants_a_client_certificate_is_said_once_with_what_to_do(start_node, pki, tmp_path, caplog):
    port = free_port()
    dest = {"name": "mtls", "host": "127.0.0.1", "port": port, "transport": "tls", "ca_file": str(pki["ca_crt"])}
    with rsyslog(tmp_path / "collector", port, pki, client_cert=True):
        node = start_node(audit={"syslog": [dest]})
        eventually(lambda: "ATNA destination mtls" in caplog.text, timeout=15)
        time.sleep(4)  # several retries
    lines = [r.getMessage() for r in caplog.records if "ATNA destination mtls" in r.getMessage()]
    assert len(lines) == 1 and "reachable again" not in caplog.text, lines  # one line per outage, no flapping
    assert "closed the connection" in lines[0] and "cert_file and key_file" in lines[0], lines[0]
    assert node.atna[0].waiting() > 0 and not (node.settings.data.atna / "mtls.cursor").exists()


@pytest.mark.parametrize("bad", [{"cert_file": "/x.pem"}, {"name": "a/b"}])
def test_bad_syslog_settings_are_refused_at_start(bad):
    from segnode.config import load_settings

    with pytest.raises(Exception, match="cert_file and key_file|name"):
        load_settings(None, {"audit": {"syslog": [{"name": "arr", "host": "h", **bad}]}})
